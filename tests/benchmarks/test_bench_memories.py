"""benchmarks/bench_memories.py end to end at a tiny size."""

from __future__ import annotations

import json

import pytest

from benchmark_scripts import script

pytestmark = pytest.mark.usefixtures("one_thread")

def test_bench_script_end_to_end(tiny_gpt2, tmp_path):
    from kvmem.factworld import corpus

    bench = script("bench_memories")
    prov = script("common").provenance("bench_memories.py", ["--tokens", "600"])
    out = bench.run(tiny_gpt2, model_name="tiny-random", corpus=corpus()[:300], corpus_name="factworld sentences", tokens=600,
                    composition_tokens=150, throughput_tokens=200, out_dir=tmp_path, stem="memories_test", k=5,
                    window=32, batch_size=4, progress=False, prov=prov)
    data = json.loads((tmp_path / "memories_test.json").read_text())
    assert data["tokens_streamed"] == 600 and len(data["agreement"]) == tiny_gpt2.cfg.n_layers
    assert data["provenance"] == prov
    md = (tmp_path / "memories_test.md").read_text()
    assert "Key-value agreement" in md and "Measured by `python benchmarks/bench_memories.py --tokens 600`" in md
    assert out["throughput"]["ratio_vs_same_depth"] > 0
    assert (tmp_path / "memories_test_agreement.png").stat().st_size > 0
