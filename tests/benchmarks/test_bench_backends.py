"""benchmarks/bench_backends.py: one measurement on factworld at a tiny size, and the driver's summary."""

from __future__ import annotations

import copy
import math

import pytest

from benchmark_scripts import script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_and_summary():
    from kvmem.core.backend import installed_backend

    bench = script("bench_backends")
    row = bench.measure("factworld", stats_tokens=256, samples=2, steps=4)
    assert row["backend"] == installed_backend() and row["threads"] == 1
    assert all(row[k] > 0 for k, _ in bench.MEASURES) and row["peak_rss_mb"] > 0
    n_layers = len(row["trace_scores"])
    assert row["trace_cells"] == n_layers * len(row["trace_scores"][0]) and len(row["ig_top"]) == 10

    other = copy.deepcopy(row)
    other["backend"] = "bridge" if row["backend"] == "hooked" else "hooked"
    other["trace_scores"][0][0] += 1e-6
    hooked, bridge = (row, other) if row["backend"] == "hooked" else (other, row)
    a = bench.agreement(hooked, bridge)
    assert a["trace_max_abs_diff"] == pytest.approx(1e-6, rel=1e-3)
    assert a["ig_same_top10"] and a["rome_same_layer"] and a["rome_k_star_norm_rel_diff"] == 0

    measures = {k: {"label": label, "hooked": 1.0, "bridge": 1.5 if k == "trace_s" else 1.0,
                    "ratio": 1.5 if k == "trace_s" else 1.0, "hooked_all": [1.0], "bridge_all": [1.0]}
                for k, label in bench.MEASURES + [("peak_rss_mb", "peak RSS MB")]}
    prov = script("common").provenance("bench_backends.py", ["--compare"])
    md = bench.markdown({"meta": prov, "model": "factworld", "rounds": 1, "measures": measures, "agreement": a,
                         "versions": {"hooked": {"transformer_lens": "3.9.0"}, "bridge": {"transformer_lens": "4.3.0"}},
                         "trace_cells": row["trace_cells"], "stats_tokens": 256})
    assert "| causal trace, kind mlp | 1.00 | 1.50 | 1.50× |" in md
    assert "**not met** for causal trace, kind mlp." in md and "identical" in md
    assert math.isnan(bench._max_rel([float("nan")], [1.0]))
