"""The localization diagnostic: its components are exactly the individual analyses run alone,
its summaries follow their documented formulas, factworld facts localize where training put
recall, and unknown facts / bad input raise."""

from __future__ import annotations

import math

import pytest
import torch

from kvmem.pipelines.diagnose import (
    Localization,
    diagnose,
    jaccard_index,
    layer_distribution,
    mean_pairwise_jaccard,
    normalized_entropy,
)
from kvmem.errors import EmptyTargetError, InvalidArgumentError, SubjectNotFoundError, UnknownFactError
from kvmem.memories import fact_memories
from kvmem.neurons import knowledge_neurons
from kvmem.core.facts import Fact
from kvmem.tracing import causal_trace, noise_level

FAST = dict(samples=3, steps=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def known_fact(factworld, world):
    """(the factworld model, its first training fact, that fact's held-out paraphrases)."""
    f = world.facts("train")[0]
    fact = Fact(f.prompt, f.subject, target_true=f.target, relation_id=f.relation)
    paraphrases = [p.prompt for p in world.prompts_for(f, "paraphrase")]
    return factworld, fact, paraphrases


@pytest.fixture(scope="module")
def loc(known_fact):
    model, fact, paraphrases = known_fact
    return diagnose(model, fact, paraphrases, **FAST)


def test_components_equal_the_separate_analyses(known_fact, loc):
    model, fact, paraphrases = known_fact
    facts = [fact] + [Fact(p, fact.subject, target_true=fact.target_true, relation_id=fact.relation_id)
                      for p in paraphrases]
    assert loc.prompts == tuple(f.prompt for f in facts) and loc.dropped == ()
    assert loc.noise == noise_level(model, facts)
    from kvmem import config

    assert loc.window == config.localization_window(model.cfg.n_layers) == 2  # factworld: 4 layers
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
    (AIE peak at layers 0-1 at the last subject token, benchmarks/results/tracing/aie_factworld.md)."""
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
    fig = loc.plot(title="custom")
    assert len(fig.axes) >= 3 and fig._suptitle.get_text() == "custom"
    import matplotlib.pyplot as plt

    plt.close(fig)
    fig, axes = plt.subplots(1, 3)
    assert loc.plot(axes) is fig  # into given axes
    plt.close(fig)


def test_unknown_fact_raises(known_fact):
    model, fact, paraphrases = known_fact
    wrong = Fact(fact.prompt, fact.subject, target_true=" purple")
    with pytest.raises(UnknownFactError, match="does not answer"):
        diagnose(model, wrong, paraphrases, **FAST)


def test_unknown_paraphrase_is_dropped(known_fact):
    model, fact, _ = known_fact
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
    tr = causal_trace(tiny_model, fact, kind="mlp", window=1, noise=loc.noise, samples=3)
    torch.testing.assert_close(loc.trace_single[0], tr.indirect_effect[:, tr.subject.last].double(), rtol=0, atol=1e-7)


def test_bad_input(known_fact):
    model, fact, paraphrases = known_fact
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
