"""benchmarks/interference_layers.py's summary: each rule's means over the facts it has, and the
paired least-interference-minus-other differences over the facts both rules have."""

from __future__ import annotations

import pytest

from benchmark_scripts import script


def _rec(chosen, diagnosed, fixed, cells, committed=None):
    return {"chosen": chosen, "diagnosed_layer": diagnosed, "fixed_layer": fixed,
            "unedited": {"ES": 0.0, "PS": 0.0, "NS": 1.0},
            "layers": {str(l): {"ES": 1.0, "PS": ps, "NS": ns} for l, (ps, ns) in cells.items()},
            "committed": committed or {}}


def test_summary_means_and_paired_differences():
    layers = script("interference_layers")
    records = [
        _rec(0, 4, 4, {0: (1.0, 1.0), 4: (1.0, 0.5)}),
        _rec(1, 2, 4, {1: (0.5, 0.9), 2: (1.0, 0.7), 4: (1.0, 0.8)}),
        # the tracing peak (layer 10) is not a candidate: the diagnose run's own measurement stands in
        _rec(0, 10, 4, {0: (1.0, 0.6), 4: (1.0, 0.6)}, committed={"diagnosed": {"ES": 1.0, "PS": 1.0, "NS": 0.2}}),
    ]
    s = layers.summarise(records, n_boot=200)
    t = s["table"]
    assert t["least-interference"]["NS"] == pytest.approx((1.0 + 0.9 + 0.6) / 3)
    assert t["tracing peak"]["NS"] == pytest.approx((0.5 + 0.7 + 0.2) / 3)
    assert t["preset"]["PS"] == pytest.approx(1.0)
    assert s["chosen_layers"] == {"0": 2, "1": 1}
    p = s["paired"]
    assert p["preset"]["n"] == 3 and p["preset"]["NS"] == pytest.approx((0.5 + 0.1 + 0.0) / 3)
    assert p["preset"]["PS"] == pytest.approx(-0.5 / 3)
    assert p["tracing peak"]["NS"] == pytest.approx((0.5 + 0.2 + 0.4) / 3)
    lo, hi = p["preset"]["NS_ci"]
    assert lo <= p["preset"]["NS"] <= hi
    md = layers.markdown({"model": "m", "command": "c", "date": "d", "machine": "x", "commit": "abc"}, s, 3)
    assert "| preset | 3 | -0.167" in md
