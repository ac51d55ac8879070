"""benchmarks/bench_stress.py: the ROME vs r-ROME update-size ratio read off the keys, the tracked
facts on CounterFact, and a run cut off and resumed from its log."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from benchmark_scripts import script
from conftest import shared_data
from kvmem.core.facts import Fact
from kvmem.editing import RomeHparams, compute_rome_edit, context_prefixes, second_moment

pytestmark = pytest.mark.usefixtures("one_thread")

REQUESTS = [Fact(f"{s} lives in the city of", s, target_true=" London", target_new=t, relation_id="city")
            for s, t in (("Alice Smith", " Rome"), ("Bob Jones", " Paris"), ("Carol White", " Berlin"))]


def test_denominator_ratio_without_optimising_v(tiny_gpt2, tmp_path):
    """bench_stress reads ‖Λ_ROME‖/‖Λ_r-ROME‖ off the keys alone; equal to the ratio of the full
    edits' Λ norms (which share δ)."""
    bench = script("bench_stress")
    corpus = shared_data("corpus", "wiki_vital_en.txt")
    stats = {1: second_moment(tiny_gpt2, 1, corpus, n_tokens=2000, cache_dir=tmp_path, progress=False)}
    hp = RomeHparams(prefixes=((3, 2),), v_num_grad_steps=3, seed=0, layer=1)
    got = bench.denominator_ratios(tiny_gpt2, REQUESTS, stats, hp, 3)
    prefixes = context_prefixes(tiny_gpt2, hp)
    full = []
    for req in REQUESTS:
        ea = compute_rome_edit(tiny_gpt2, req, stats=stats[1], hparams=hp, prefixes=prefixes)
        ep = compute_rome_edit(tiny_gpt2, req, stats=stats[1], prefixes=prefixes,
                               hparams=RomeHparams(**{**hp.__dict__, "update_key": "prompt"}))
        full.append(float(ep.lam.norm() / ea.lam.norm()))
    assert got["n"] == 3
    assert got["ratio_median"] == pytest.approx(sorted(full)[1], rel=1e-6)
    assert got["ratio_max"] == pytest.approx(max(full), rel=1e-6)


def test_counterfact_tracked_facts(tiny_gpt2, monkeypatch):
    """On CounterFact the tracked facts are answered known_1000 facts about unedited subjects;
    neighbours share an edited request's relation and true object, known facts do not."""
    import kvmem.recall as recall

    bench = script("bench_stress")

    class Recall:  # the model "answers" every other fact
        def __init__(self, facts):
            self.known = torch.tensor([i % 2 == 0 for i in range(len(facts))])

    monkeypatch.setattr(recall, "fact_recall", lambda model, facts, **kw: Recall(facts))
    corpus = shared_data("corpus", "wiki_vital_en.txt")
    args = argparse.Namespace(counterfact=str(shared_data("counterfact", "counterfact_dev_250.json")),
                              known=str(shared_data("known_1000.json")), corpus=str(corpus), n_edits=150, n_eval=100)
    requests, neighbours, known, gen, text, source = bench.counterfact_setup(tiny_gpt2, args)
    assert len(requests) == 150 and len({(r.subject, r.relation_id) for r in requests}) == 150
    at_risk = {(r.relation_id, r.target_true) for r in requests}
    edited = {r.subject for r in requests}
    assert len(neighbours) == 100 and len(known) == 100 and gen
    assert all((f.relation_id, f.target_true) in at_risk and f.subject not in edited for f in neighbours)
    assert all((f.relation_id, f.target_true) not in at_risk and f.subject not in edited for f in known)
    assert text == str(corpus) and source.startswith("counterfact_dev_250.json")


def test_stop_after_summarises_a_cut_off_run(tmp_path):
    """--stop-after N applies N edits and reports the run as partial; --stop-after 0 summarises the
    log without adding edits; a plain rerun finishes it from the log."""
    bench = script("bench_stress")
    out = tmp_path / "st"
    base = ["--model", "factworld", "--n-edits", "4", "--every", "2", "--n-eval", "8", "--gen-tokens", "4",
            "--stats-tokens", "3000", "--denominator-sample", "0", "--variants", "rome", "--out", str(out),
            "--log-dir", str(tmp_path / "logs"), "--quiet", "--device", "cpu"]

    def run(*extra):
        bench.main(base + list(extra))
        return json.loads(Path(f"{out}.json").read_text())["results"]["rome"], Path(f"{out}.md").read_text()

    r, md = run("--stop-after", "3")
    assert r["n_done"] == 3 and r["final"]["step"] == 2 and "**partial**" in md and "rome stopped after 3 of 4" in md
    r0, md0 = run("--stop-after", "0")
    assert r0["n_done"] == 3 and r0["n_applied"] == r["n_applied"] and "**partial**" in md0
    assert r0["final"] == r["final"]  # read back from the log, not recomputed differently
    r1, md1 = run()
    assert r1["n_done"] == 4 and r1["resumed_from"] == 3 and r1["final"]["step"] == 4 and "partial" not in md1.lower()
    assert Path(f"{out}.png").stat().st_size > 0 and Path(f"{out}_rome.png").exists()  # side by side, and per variant
    assert md1.startswith("# Sequential editing stress test: factworld\n\nMeasured by `python benchmarks/bench_stress.py")
