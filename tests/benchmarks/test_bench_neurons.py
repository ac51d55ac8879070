"""benchmarks/bench_neurons.py: the published effects experiment's script, end to end at tiny
size, and resumed from its log (moved here from tests/test_neurons.py)."""

from __future__ import annotations

import pytest

from benchmark_scripts import script
from conftest import shared_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_effects_script_tiny(tmp_path):
    pararel = shared_data("pararel", "data_all_allbags.json")
    bench = script("bench_neurons")
    args = [
        "effects", "--model", "tiny-random", "--pararel", str(pararel), "--relations", "2", "--only", "P103", "P36",
        "--facts-per-relation", "1", "--scan-per-relation", "2", "--max-prompts", "2", "--steps", "2",
        "--controls", "1", "--known-top-k", "60000", "--threads", "1", "--share", "0.5",
        "--out-dir", str(tmp_path),
    ]
    result = bench.main(args)
    s = result["summary"]
    assert s["facts"] == 2 and s["relations"] == 2
    assert (tmp_path / "neurons_effects_tiny-random.json").exists()
    assert (tmp_path / "neurons_effects_tiny-random.md").exists()
    assert s["facts_with_neurons"] >= 1  # at this size and share, some facts keep neurons
    assert abs(sum(s["layer_distribution"].values()) - 1) < 1e-6
    assert s["suppress_mean_over_facts"] == s["suppress_mean_over_facts"]  # not NaN
    # resumable: one log line per fact; a rerun reuses them and reports the same table
    log = tmp_path / "neurons_effects_tiny-random.jsonl"
    assert len(log.read_text().splitlines()) == 1 + 2
    again = bench.main(args)["summary"]
    assert len(log.read_text().splitlines()) == 1 + 2
    for key in ("facts", "facts_with_neurons", "suppress_mean_over_facts", "amplify_mean_over_facts"):
        assert again[key] == s[key] or (again[key] != again[key] and s[key] != s[key])
    assert again["seconds_all_facts"] == s["seconds_all_facts"]
