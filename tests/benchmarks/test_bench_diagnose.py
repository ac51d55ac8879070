"""benchmarks/bench_diagnose.py: shards merged equal one run; PARAREL records are known facts."""

from __future__ import annotations

import argparse
import json
import math
import platform

import pytest
import torch

from benchmark_scripts import script
from conftest import shared_data
from kvmem.errors import RunLogError


@pytest.mark.slow
def test_sharded_equals_one_run(tmp_path):
    """Two shards merged give the rows of one unsharded run; the facts are factworld's CounterFact
    records (kvmem.factworld.counterfact_records); other settings are refused, not mixed."""
    from kvmem.factworld import counterfact_records

    bench = script("bench_diagnose")
    common = ["--model", "factworld", "--n-facts", "3", "--n-unrelated", "4", "--samples", "2", "--ig-steps", "3",
              "--bootstrap", "10", "--stats-tokens", "3000", "--quiet"]
    bench.main(common + ["--out", str(tmp_path / "one")])
    for i in range(2):
        bench.main(common + ["--out", str(tmp_path / "sh"), "--shard", f"{i}/2"])
    assert not (tmp_path / "sh.md").exists()
    bench.main(common + ["--out", str(tmp_path / "sh"), "--merge", "2"])

    def rows(path):
        lines = path.read_text().splitlines()
        assert json.loads(lines[0])["settings"]["model"] == "factworld"  # the run log's settings header
        out = {}
        for line in lines[1:]:
            r = json.loads(line)["record"]
            out[r["case_id"]] = {k: v for k, v in r.items() if not k.endswith("_s")}  # timings differ
        return out

    one, merged = rows(tmp_path / "one.jsonl"), rows(tmp_path / "sh.jsonl")
    assert sorted(one) == sorted(merged) and len(one) == 3
    records = {r.case_id: r for r in counterfact_records(n_neighbours=10, seed=0)}
    for k in one:
        assert one[k]["prompt"] == records[k].request.prompt and one[k]["target_new"] == records[k].request.target_new
        for col, v in one[k].items():
            w = merged[k][col]
            if isinstance(v, float) and not math.isnan(v):
                assert w == pytest.approx(v, rel=1e-6, abs=1e-9), (k, col)
            elif not (isinstance(v, float) and math.isnan(v)):
                assert w == v, (k, col)
    md = (tmp_path / "sh.md").read_text()
    assert "Mean outcomes" in md and f"rows computed on: cpu ({platform.machine()}) 3." in md  # each row's machine
    assert json.loads((tmp_path / "sh.json").read_text())["command"].startswith("python benchmarks/bench_diagnose.py")
    with pytest.raises(RunLogError, match="samples"):
        bench.main([x if x != "2" else "3" for x in common] + ["--out", str(tmp_path / "one")])


def test_pararel_cases_are_known_facts_with_known_paraphrases_first(tiny_gpt2, monkeypatch):
    """--source pararel keeps only records the model answers (prompt and one paraphrase, top-1),
    putting the answered paraphrases first; a model that knows none gives none."""
    import kvmem.recall as recall

    bench = script("bench_diagnose")
    args = argparse.Namespace(pararel=str(shared_data("pararel", "data_all_allbags.json")), seed=0, n_facts=5,
                              max_scan=128, known=str(shared_data("known_1000.json")), n_unrelated=2,
                              corpus=str(shared_data("corpus", "wiki_vital_en.txt")))
    cases, _, _, _ = bench.pararel_cases(tiny_gpt2, args)
    assert cases == [] and args.pararel_scanned == 128  # a random model knows no PARAREL fact

    # the selection rule itself, with recall faked: the model "knows" prompts ending in " in" or naming Turing
    def knows(prompt):
        return prompt.endswith(" in") or "Turing" in prompt

    class Recall:
        def __init__(self, facts):
            self.known = torch.tensor([knows(f.prompt) for f in facts])

    monkeypatch.setattr(recall, "fact_recall", lambda model, facts, **kw: Recall(facts))
    cases, _, _, _ = bench.pararel_cases(tiny_gpt2, args)
    assert len(cases) == 5
    first = args.pararel_scanned
    args.n_facts = 10_000  # more than the scan can find: it goes on to --max-scan, chunk after chunk
    everything, _, _, _ = bench.pararel_cases(tiny_gpt2, args)
    assert args.pararel_scanned == 128 and first <= 128 and len(everything) > len(cases)
    assert everything[:5] == cases
    assert sorted(args.scan_index.values()) == sorted(set(args.scan_index.values()))
    assert all(0 <= i < 128 for i in args.scan_index.values())
    for c in cases:
        known = [knows(p) for p in c.paraphrase_prompts]
        assert knows(c.request.prompt) and any(known)
        assert known == sorted(known, reverse=True)  # answered paraphrases first
    assert len({c.request.relation_id for c in cases}) == len(cases)  # relations taken in turn
    assert len({c.request.relation_id for c in everything}) > 5
