"""benchmarks/bench_editing.py and editing_neighbourhood.py end to end at tiny sizes: the ROME
table, its shards merged, factworld's records, and the neighbourhood ablation's reference."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmark_scripts import script
from conftest import shared_data
from kvmem.data import load_counterfact


def test_bench_script_end_to_end_tiny(tmp_path):
    shared_data("counterfact", "counterfact_dev_250.json")
    shared_data("corpus", "wiki_vital_en.txt")
    bench = script("bench_editing")
    out = tmp_path / "editing"
    res = bench.main([
        "--models", "tiny", "--n-records", "2", "--stats-tokens", "1500", "--throughput-tokens", "500",
        "--layer", "1", "--gen-prompts", "1", "--gen-tokens", "3", "--cache-dir", str(tmp_path / "c"),
        "--out", str(out), "--quiet",
    ])
    data = json.loads(Path(f"{out}.json").read_text())
    r = data["results"][0]
    assert r["stats"]["n_tokens"] == 1500 and r["records"]["n"] == 2
    assert set(r["summary"]) == {"unedited", "ROME"}
    md = Path(f"{out}.md").read_text()
    assert "ES" in md and md.splitlines()[2].startswith("Measured by `python benchmarks/bench_editing.py --models tiny")
    assert res[0]["edit_s_mean"] > 0

    # the same records in two shards (as parallel workers would), merged: the same table
    common = ["--models", "tiny", "--n-records", "2", "--stats-tokens", "1500", "--throughput-tokens", "500",
              "--layer", "1", "--gen-prompts", "1", "--gen-tokens", "3", "--cache-dir", str(tmp_path / "c"),
              "--out", str(tmp_path / "sharded"), "--quiet"]
    for i in range(2):
        shard = bench.main(common + ["--shard", f"{i}/2"])
        assert shard[0]["records"]["n"] == 1 and not Path(f"{tmp_path / 'sharded'}.json").exists()
    bench.main(common + ["--merge", "2"])
    merged = json.loads(Path(f"{tmp_path / 'sharded'}.json").read_text())["results"][0]
    assert merged["records"]["n"] == 2
    for cond in ("unedited", "ROME"):
        for m in ("ES", "PS", "NS", "EM", "NM"):
            assert merged["summary"][cond][m] == pytest.approx(r["summary"][cond][m], abs=1e-9), (cond, m)


def test_neighbourhood_ablation_script_tiny(tmp_path, monkeypatch):
    """The NS ablation's reference condition equals a plain ROME edit measured by record_metrics;
    a rerun resumes from its log."""
    from kvmem.editing import compute_rome_edit, context_prefixes, edited, rome_hparams, second_moment
    from kvmem.evaluation import record_metrics

    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path / "cache"))
    cf = shared_data("counterfact", "counterfact_dev_250.json")
    corpus = shared_data("corpus", "wiki_vital_en.txt")
    bench_editing, editing_neighbourhood = script("bench_editing"), script("editing_neighbourhood")
    args = ["--model", "tiny", "--n-records", "1", "--layers", "1", "--stats-tokens", "1500", "3000",
            "--strengths", "0.5", "--threads", "1", "--out", str(tmp_path / "nb"), "--quiet"]
    res = editing_neighbourhood.main(args)
    table = res["summary"]["table"]
    assert set(table) == {"unedited", "L1 C 1k", "L1 C 3k", "L1 no C (u = k*)", "L1 C 1k x0.5"}

    model = bench_editing.load("tiny")
    rec = load_counterfact(cf, limit=1)[0]
    sm = second_moment(model, 1, str(corpus), n_tokens=1500, progress=False)
    hp = dataclasses.replace(rome_hparams(model), layer=1)
    edit = compute_rome_edit(model, rec.request, layer=1, stats=sm, hparams=hp, prefixes=context_prefixes(model, hp))
    plain = record_metrics(model, rec, generation=False)
    with edited(model, edit):
        after = record_metrics(model, rec, generation=False)
    for k in ("ES", "PS", "NS"):
        assert table["unedited"][k] == pytest.approx(100 * plain[k])
        assert table["L1 C 1k"][k] == pytest.approx(100 * after[k])
    assert table["L1 C 1k x0.5"]["norm dW"] == pytest.approx(table["L1 C 1k"]["norm dW"] / 2, rel=1e-6)
    lines = len(Path(f"{tmp_path / 'nb'}.jsonl").read_text().splitlines())
    again = editing_neighbourhood.main(args)
    assert json.dumps(again["summary"]) == json.dumps(res["summary"])
    assert len(Path(f"{tmp_path / 'nb'}.jsonl").read_text().splitlines()) == lines == 2


def test_bench_script_on_factworld(tmp_path):
    """The benchmark's table on facts the model knows, where the truth is known: unedited, the model
    prefers each true object (ES = PS = 0, NS = 100); ROME's edits land (ES = 100, as in
    test_editing_factworld). Each summary figure is 100 x the mean of its per-record column, and
    S the harmonic mean of ES, PS and NS (ROME's definitions). The records are factworld's
    (kvmem.factworld.counterfact_records), each with its own prompt for GE."""
    import pandas as pd

    from kvmem.factworld import counterfact_records

    bench = script("bench_editing")
    records = bench.factworld_records(3, seed=0)
    world = {r.case_id: r for r in counterfact_records(n_neighbours=10, seed=0)}
    for r in records:
        assert dataclasses.replace(r, generation_prompts=()) == world[r.case_id]
        assert r.generation_prompts == (r.request.prompt,) and r.neighborhood_prompts
    out = tmp_path / "editing"
    res = bench.main([
        "--models", "factworld", "--n-records", "3", "--stats-tokens", "3000", "--throughput-tokens", "500",
        "--gen-tokens", "0", "--cache-dir", str(tmp_path / "c"), "--out", str(out), "--quiet",
    ])
    assert res[0]["records"]["n"] == 3 and res[0]["errors"] == []
    table, frame = res[0]["summary"], pd.read_csv(res[0]["records_csv"])
    assert sorted(frame["case_id"].unique()) == sorted(r.case_id for r in records)
    unedited, rome = table["unedited"], table["ROME"]
    assert (unedited["ES"], unedited["PS"], unedited["NS"]) == (0.0, 0.0, 100.0)
    assert unedited["EM"] < -90  # P(new) - P(true), in points: the true object holds nearly all the mass
    assert rome["ES"] == 100.0 and rome["EM"] > 90
    assert rome["PS"] >= 200 / 3 and rome["NS"] >= 200 / 3  # held-out templates follow; neighbours keep
    for condition in ("unedited", "ROME"):
        rows = frame[frame["condition"] == condition]
        assert len(rows) == 3 and table[condition]["n"] == 3 and table[condition]["n_failed"] == 0
        for m in ("ES", "EM", "PS", "PM", "NS", "NM"):
            assert table[condition][m] == pytest.approx(100 * rows[m].mean(), abs=1e-6), (condition, m)
        es, ps, ns = (table[condition][m] for m in ("ES", "PS", "NS"))
        s = 0.0 if min(es, ps, ns) == 0 else 3 / (1 / es + 1 / ps + 1 / ns)
        assert table[condition]["S"] == pytest.approx(s)
