"""Does a rerun reproduce a committed result? Compare the numbers of two result JSON files.

    python benchmarks/compare_results.py benchmarks/results/tracing/aie_factworld.json /tmp/rerun/aie_factworld.json \
        --out benchmarks/results/reruns.md

Walks both files and pairs every number by its path (dict keys and list indices). Timings, dates,
commands and machine descriptions are skipped (keys named in SKIP, and timing-like keys: `*_s`,
`*_s_*`, `*per_s*`, `*seconds*`, `wall*`, throughput ratios `*_vs_plain*`):
they are not results. Reports how many numbers were compared, how many are bit-equal, the largest
absolute and relative difference and where, and every path present in one file only. With --out, appends
a section to a markdown file, so one file can collect the checks of several reruns.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common import command_line

SKIP = {"command", "date", "machine", "commit", "wall_s", "eval_s", "stats_s", "tok_per_s", "tokens_per_s",
        "seconds", "peak_rss_mb", "rss_mb", "threads", "torch_threads", "note", "log", "resumed"}


def _skipped(key: str) -> bool:
    # timings: *_s, *_s_median, tok_s, *_per_s, seconds, wall...
    return (key in SKIP or key.endswith("_s") or "_s_" in key or "per_s" in key or "seconds" in key
            or key.startswith("wall") or "_vs_plain" in key)


def numbers(obj, path: str = "") -> dict[str, float]:
    """Every number in a JSON value, keyed by its path; timing and provenance keys left out."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not _skipped(str(k)):
                out.update(numbers(v, f"{path}.{k}" if path else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(numbers(v, f"{path}[{i}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[path] = float(obj)
    return out


def compare(a: dict[str, float], b: dict[str, float]) -> dict:
    common = sorted(set(a) & set(b))
    equal = worst_abs = worst_rel = 0.0
    where_abs = where_rel = None
    for p in common:
        x, y = a[p], b[p]
        if x == y or (math.isnan(x) and math.isnan(y)):
            equal += 1
            continue
        d = abs(x - y)
        r = d / max(abs(x), abs(y))
        if d > worst_abs:
            worst_abs, where_abs = d, p
        if r > worst_rel:
            worst_rel, where_rel = r, p
    return {"compared": len(common), "equal": int(equal), "max_abs": worst_abs, "max_abs_at": where_abs,
            "max_rel": worst_rel, "max_rel_at": where_rel,
            "only_first": sorted(set(a) - set(b)), "only_second": sorted(set(b) - set(a))}


def report(first: str, second: str, c: dict) -> str:
    lines = [f"## `{Path(first).name}`", "", f"`{first}` against `{second}`:",
             f"{c['compared']} numbers compared, {c['equal']} bit-equal; largest absolute difference "
             f"{c['max_abs']:.3g} (at `{c['max_abs_at']}`), largest relative difference {c['max_rel']:.3g} "
             f"(at `{c['max_rel_at']}`)."]
    for name, key in (("first", "only_first"), ("second", "only_second")):
        if c[key]:
            shown = ", ".join(f"`{p}`" for p in c[key][:10])
            lines.append(f"Only in the {name} file ({len(c[key])}): {shown}{' ...' if len(c[key]) > 10 else ''}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", help="a result file (.json), e.g. the committed one")
    ap.add_argument("second", help="the other (.json), e.g. a rerun's")
    ap.add_argument("--out", default=None, help="append the comparison to this markdown file")
    args = ap.parse_args(argv)
    a, b = (numbers(json.loads(Path(p).read_text())) for p in (args.first, args.second))
    c = compare(a, b)
    text = report(args.first, args.second, c) + f"\n`{command_line(__file__, argv)}`\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return c


if __name__ == "__main__":
    main()
