"""The localization diagnostic: its components are exactly the individual analyses run alone,
its summaries follow their documented formulas, factworld facts localize where training put
recall, and unknown facts / bad input raise."""

from __future__ import annotations

import math

import pytest
import torch

from kvmem.pipelines.diagnose import (
    Localization,
    UnknownFactError,
    diagnose,
    jaccard_index,
    layer_distribution,
    mean_pairwise_jaccard,
    normalized_entropy,
)
from kvmem.errors import EmptyTargetError, InvalidArgumentError, SubjectNotFoundError
from kvmem.memories import fact_memories
from kvmem.neurons import knowledge_neurons
from kvmem.core.facts import Fact
from kvmem.tracing import causal_trace, noise_level

FAST = dict(samples=3, steps=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def factworld():
    fw = pytest.importorskip("kvmem.factworld")
    model, world = fw.factworld_hooked_transformer(), fw.shipped_world()
    for p in model.parameters():
        p.requires_grad_(False)
    f = world.facts("train")[0]
    fact = Fact(f.prompt, f.subject, target_true=f.target, relation_id=f.relation)
    paraphrases = [p.prompt for p in world.prompts_for(f, "paraphrase")]
    return model, fact, paraphrases


@pytest.fixture(scope="module")
def loc(factworld):
    model, fact, paraphrases = factworld
    return diagnose(model, fact, paraphrases, **FAST)


def test_components_equal_the_separate_analyses(factworld, loc):
    model, fact, paraphrases = factworld
    facts = [fact] + [Fact(p, fact.subject, target_true=fact.target_true, relation_id=fact.relation_id)
                      for p in paraphrases]
    assert loc.prompts == tuple(f.prompt for f in facts) and loc.dropped == ()
    assert loc.noise == noise_level(model, facts)
    for i, f in enumerate(facts):
        for w, got in ((1, loc.trace_single[i]), (loc.window, loc.trace_window[i])):
            tr = causal_trace(model, f, kind="mlp", window=w, noise=loc.noise, samples=3, seed=0)
            torch.testing.assert_close(got, tr.indirect_effect[:, tr.subject.last].double(), rtol=0, atol=1e-7)
        fm = fact_memories(model, f)
        torch.testing.assert_close(loc.memory_subject[i], fm.total[:, 0].double(), rtol=0, atol=1e-6)
        torch.testing.assert_close(loc.memory_last[i], fm.total[:, 1].double(), rtol=0, atol=1e-6)
    kn = knowledge_neurons(model, facts, steps=4, progress=False)
    assert loc.neurons == tuple(kn.neurons)
    assert loc.neuron_sets == tuple(tuple(a.neurons_above(0.2)) for a in kn.attributions)
    torch.testing.assert_close(loc.ig_layer, torch.stack([a.scores.double().clamp(min=0).sum(-1) for a in kn.attributions]))


def test_summaries_follow_their_formulas(loc):
    ie = loc.trace_single.mean(0).clamp(min=0)
    p = ie / ie.sum()
    torch.testing.assert_close(loc.layer_share, p)
    assert loc.peak_layer == int(p.argmax()) and loc.peak_share == pytest.approx(float(p.max()))
    h = -sum(float(x) * math.log(float(x)) for x in p if x > 0) / math.log(loc.n_layers)
    assert loc.entropy == pytest.approx(h) and loc.concentration == pytest.approx(1 - h)
    sets = [set(s) for s in loc.neuron_sets]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    j = sum(len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs) / len(pairs)
    assert loc.jaccard == pytest.approx(j)
    assert loc.score == pytest.approx(math.sqrt((1 - h) * j))
    assert 0 <= loc.score <= 1


def test_factworld_localizes_at_the_subject_funnel(loc):
    """factworld assembles the subject at its last token and looks the fact up in its first MLPs
    (AIE peak at layers 0-1 at the last subject token, benchmarks/results/aie_factworld.md)."""
    assert loc.peak_layer in (0, 1)
    assert loc.peak_share > 0.4
    assert float(loc.p_clean.min()) > 0.5


def test_views(loc):
    df = loc.to_frame()
    assert len(df) == len(loc.prompts) * loc.n_layers
    assert {"trace_single", "trace_window", "memory_subject", "memory_last", "ig_layer"} <= set(df.columns)
    s = loc.summary()
    assert s["peak_layer"] == loc.peak_layer and s["score"] == loc.score
    html = str(loc.show())
    assert "localization score" in html and "<script src" not in html
    fig = loc.plot()
    assert len(fig.axes) >= 3
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_unknown_fact_raises(factworld):
    model, fact, paraphrases = factworld
    wrong = Fact(fact.prompt, fact.subject, target_true=" purple")
    with pytest.raises(UnknownFactError, match="does not answer"):
        diagnose(model, wrong, paraphrases, **FAST)


def test_unknown_paraphrase_is_dropped(factworld):
    model, fact, _ = factworld
    odd = f"Yesterday {fact.subject} said the word"
    loc = diagnose(model, fact, [odd], **FAST)
    assert loc.dropped == (odd,) and loc.prompts == (fact.prompt,)
    assert loc.jaccard == 1.0  # one prompt: its neuron set agrees with itself


def test_tiny_models_run_without_knowing(tiny_model):
    fact = Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", target_true=" Paris")
    with pytest.raises(UnknownFactError):
        diagnose(tiny_model, fact, **FAST)
    loc = diagnose(tiny_model, fact, ["Where is The Eiffel Tower? In"], require_known=False, **FAST)
    assert isinstance(loc, Localization) and not loc.known
    assert loc.trace_single.shape == (2, tiny_model.cfg.n_layers)
    tr = causal_trace(tiny_model, fact, kind="mlp", noise=loc.noise, samples=3)
    torch.testing.assert_close(loc.trace_single[0], tr.indirect_effect[:, tr.subject.last].double(), rtol=0, atol=1e-7)


def test_bad_input(factworld):
    model, fact, paraphrases = factworld
    with pytest.raises(InvalidArgumentError, match="window"):
        diagnose(model, fact, window=0)
    with pytest.raises(InvalidArgumentError, match="window"):
        diagnose(model, fact, window=model.cfg.n_layers + 1)
    with pytest.raises(InvalidArgumentError, match="repeat"):
        diagnose(model, fact, [paraphrases[0], paraphrases[0]])
    with pytest.raises(SubjectNotFoundError):
        diagnose(model, fact, ["Nobody lives in the city of"])
    with pytest.raises(InvalidArgumentError, match="same answer"):
        diagnose(model, fact, [Fact(paraphrases[0], fact.subject, target_true=" Oslo")])
    with pytest.raises(EmptyTargetError):
        diagnose(model, Fact(fact.prompt, fact.subject))
    with pytest.raises((InvalidArgumentError, TypeError)):  # beartype may reject it first
        diagnose(model, fact.prompt)


def test_helpers():
    assert jaccard_index([(0, 1), (1, 2)], [(1, 2)]) == 0.5
    assert jaccard_index([], []) == 1.0
    assert mean_pairwise_jaccard([[(0, 1)]]) == 1.0
    assert mean_pairwise_jaccard([[(0, 1)], [(0, 1)], [(0, 2)]]) == pytest.approx(1 / 3)
    p = layer_distribution(torch.tensor([0.0, -1.0, 3.0, 1.0]))
    torch.testing.assert_close(p, torch.tensor([0.0, 0.0, 0.75, 0.25], dtype=torch.float64))
    assert normalized_entropy(torch.tensor([1.0, 0.0, 0.0])) == 0.0
    assert normalized_entropy(torch.full((4,), 0.25)) == pytest.approx(1.0)
    assert normalized_entropy(torch.zeros(3)) == 1.0


@pytest.mark.slow
def test_bench_script_sharded_equals_one_run(tmp_path):
    """benchmarks/bench_diagnose.py: two shards merged give the rows of one unsharded run."""
    import json
    import platform
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import bench_diagnose
    finally:
        sys.path.pop(0)
    common = ["--model", "factworld", "--n-facts", "3", "--n-unrelated", "4", "--samples", "2", "--ig-steps", "3",
              "--bootstrap", "10", "--stats-tokens", "3000", "--quiet"]
    bench_diagnose.main(common + ["--out", str(tmp_path / "one")])
    for i in range(2):
        bench_diagnose.main(common + ["--out", str(tmp_path / "sh"), "--shard", f"{i}/2"])
    assert not (tmp_path / "sh.md").exists()
    bench_diagnose.main(common + ["--out", str(tmp_path / "sh"), "--merge", "2"])

    def rows(path):
        lines = path.read_text().splitlines()
        assert json.loads(lines[0])["settings"]["model"] == "factworld"  # the run log's settings header
        out = {}
        for line in lines[1:]:
            r = json.loads(line)["record"]
            out[r["case_id"]] = {k: v for k, v in r.items() if not k.endswith("_s")}  # timings differ
        return out

    one, merged = rows(tmp_path / "one.jsonl"), rows(tmp_path / "sh.jsonl")
    assert sorted(one) == sorted(merged) == [0, 1, 2]
    for k in one:
        for col, v in one[k].items():
            w = merged[k][col]
            if isinstance(v, float) and not math.isnan(v):
                assert w == pytest.approx(v, rel=1e-6, abs=1e-9), (k, col)
            elif not (isinstance(v, float) and math.isnan(v)):
                assert w == v, (k, col)
    md = (tmp_path / "sh.md").read_text()
    assert "Mean outcomes" in md and f"rows computed on: cpu ({platform.machine()}) 3)" in md  # each row's machine
    # a rerun with other settings is refused, not mixed into the same log
    from kvmem.runs import RunLogError

    with pytest.raises(RunLogError, match="samples"):
        bench_diagnose.main([x if x != "2" else "3" for x in common] + ["--out", str(tmp_path / "one")])


def test_bench_pararel_cases_are_known_facts_with_known_paraphrases_first(tiny_gpt2, monkeypatch):
    """bench_diagnose --source pararel keeps only records the model answers (prompt and one
    paraphrase, top-1), putting the answered paraphrases first; a model that knows none gives none."""
    import argparse
    import sys
    from pathlib import Path

    import kvmem.recall as recall
    from conftest import shared_data

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_diagnose
    finally:
        sys.path.pop(0)
    args = argparse.Namespace(pararel=str(shared_data("pararel", "data_all_allbags.json")), seed=0, n_facts=5,
                              max_scan=128, known=str(shared_data("known_1000.json")), n_unrelated=2, corpus="c")
    cases, _, _, _ = bench_diagnose.pararel_cases(tiny_gpt2, args)
    assert cases == [] and args.pararel_scanned == 128  # a random model knows no PARAREL fact

    # the selection rule itself, with recall faked: the model "knows" prompts ending in " in" or naming Turing
    def knows(prompt):
        return prompt.endswith(" in") or "Turing" in prompt

    class Recall:
        def __init__(self, facts):
            self.known = torch.tensor([knows(f.prompt) for f in facts])

    monkeypatch.setattr(recall, "fact_recall", lambda model, facts, **kw: Recall(facts))
    cases, _, _, _ = bench_diagnose.pararel_cases(tiny_gpt2, args)
    assert len(cases) == 5
    first = args.pararel_scanned
    args.n_facts = 10_000  # more than the scan can find: it goes on to --max-scan, chunk after chunk
    everything, _, _, _ = bench_diagnose.pararel_cases(tiny_gpt2, args)
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
