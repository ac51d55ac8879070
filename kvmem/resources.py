"""Process memory readings for benchmarks (Linux `/proc`; NaN elsewhere)."""

from __future__ import annotations


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """Resident memory of this process now, in MB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return _status_mb("VmHWM")
