"""Knowledge neurons: batched integrated gradients vs a plain per-layer loop, completeness with a
stated quadrature error bound, refinement, interventions, views and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem.errors import EmptyTargetError, InvalidArgumentError, KvmemError, LayerOutOfRangeError
from kvmem.neurons import (
    KnowledgeNeurons,
    NeuronAttribution,
    NeuronEffect,
    integrated_gradients,
    knowledge_neurons,
    neuron_effect,
    random_neurons,
    refine,
    resolve_rule,
    riemann_nodes,
    scaling_hooks,
    teacher_forced,
)
from kvmem.core.facts import Fact
from kvmem.viz import HTMLView
from reference import per_layer_ig  # tests/reference.py (tests/ is on sys.path under pytest)

PROMPT = "The capital of France is"


# The plain reference (one layer at a time, full-length rows, TransformerLens's own forward) is
# `per_layer_ig` in tests/reference.py, shared with benchmarks/bench_neurons.py.

def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("target", ["Paris", "Paris Hilton"])
def test_batched_equals_per_layer_loop(tiny_model, target):
    ref = per_layer_ig(tiny_model, PROMPT, target, [0, 1, 2], 6, "left")
    got = integrated_gradients(tiny_model, PROMPT, target, steps=6, rule="left")
    assert isinstance(got, NeuronAttribution)
    assert got.scores.shape == (3, tiny_model.cfg.d_mlp)
    assert rel_err(got.scores, ref) < 1e-4
    # Split into several passes and a layer subset: the same numbers.
    chunked = integrated_gradients(tiny_model, PROMPT, target, layers=[2, 0], steps=6, rule="left", batch_size=4)
    assert chunked.layers == (0, 2)
    assert rel_err(chunked.scores, ref[[0, 2]]) < 1e-4


def test_batched_equals_loop_pre_site_and_custom_baseline(tiny_gpt2):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, tiny_gpt2.cfg.d_mlp, generator=gen) * 0.1
    ref = per_layer_ig(tiny_gpt2, PROMPT, "Paris", [1, 2], 5, "linspace", site="pre", baseline=base)
    got = integrated_gradients(tiny_gpt2, PROMPT, "Paris", layers=[1, 2], steps=5, rule="linspace",
                               site="pre", baseline=base)
    assert rel_err(got.scores, ref) < 1e-4


def test_fact_input_and_multi_token_objective(tiny_gpt2):
    fact = Fact(PROMPT, "France", target_true="Paris Hilton")
    a = integrated_gradients(tiny_gpt2, fact, steps=2)
    b = integrated_gradients(tiny_gpt2, PROMPT, "Paris Hilton", steps=2)
    assert torch.equal(a.scores, b.scores)
    assert len(a.target_ids) == 2
    # The objective is the product of teacher-forced token probabilities.
    tokens = teacher_forced(tiny_gpt2, PROMPT, "Paris Hilton").tokens[None]
    logp = tiny_gpt2(tokens).log_softmax(-1)[0]
    P = a.str_tokens.__len__() - 1
    expected = float((logp[P, a.target_ids[0]] + logp[P + 1, a.target_ids[1]]).exp())
    assert a.prob == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------------------------
# Completeness with a stated error bound (float64 model, so the quadrature error is what we see).

@pytest.fixture(scope="module")
def tiny64():
    from conftest import build_tiny

    model = build_tiny("gpt2", seed=1, dtype=torch.float64, default_prepend_bos=False, n_layers=2, d_model=32,
                       n_ctx=32, d_head=8, n_heads=4, d_mlp=48, d_vocab=8192)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def path_values(model, prompt, target, layer, n):
    """g(a) = f(a x) for a on a grid of n + 1 points (layer `layer`, zero baseline)."""
    prep = teacher_forced(model, prompt, target)
    P = prep.last_pos
    name = f"blocks.{layer}.mlp.hook_post"
    _, cache = model.run_with_cache(prep.tokens[None], names_filter=name)
    x = cache[name][0, P]
    grid = torch.linspace(0, 1, n + 1, dtype=torch.float64)

    def hook(act, hook):
        act = act.clone()
        act[:, P] = grid[:, None] * x
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(prep.tokens[None].expand(n + 1, -1), fwd_hooks=[(name, hook)])
    return logits.log_softmax(-1)[:, P, prep.target_ids[0]].exp(), 1.0 / n


@pytest.mark.parametrize("layer", [0, 1])
def test_completeness_error_bound(tiny64, layer):
    g, h = path_values(tiny64, PROMPT, "Paris", layer, 160)
    d2 = (g[2:] - 2 * g[1:-1] + g[:-2]) / h**2
    d3 = (g[3:] - 3 * g[2:-1] + 3 * g[1:-2] - g[:-3]) / h**3
    M2, M3 = float(d2.abs().max()), float(d3.abs().max())
    delta = float(g[-1] - g[0])
    bounds = {  # |sum_i IG_i - (f(x) - f(0))| <= bound(m)
        "left": lambda m: M2 / (2 * m),
        "right": lambda m: M2 / (2 * m),
        "midpoint": lambda m: M3 / (24 * m**2),
        "trapezoid": lambda m: M3 / (12 * m**2),
    }
    for rule, bound in bounds.items():
        errs = []
        for m in (4, 8, 16):
            a = integrated_gradients(tiny64, PROMPT, "Paris", layers=layer, steps=m, rule=rule)
            assert float(a.prob - a.baseline_probs[0]) == pytest.approx(delta, rel=1e-9, abs=1e-15)
            err = abs(float(a.completeness_gap[0]))
            errs.append(err)
            assert err <= 1.25 * bound(m) + 1e-13 * abs(delta), (rule, m, err, bound(m))
        # converges as steps grow (a first-order rule's error may change sign, so only overall)
        assert errs == sorted(errs, reverse=True) if rule in ("midpoint", "trapezoid") else errs[-1] < errs[0], (rule, errs)
    # Midpoint at m = 32 is accurate to a small fraction of the total.
    a = integrated_gradients(tiny64, PROMPT, "Paris", layers=layer, steps=16)
    assert abs(float(a.completeness_gap[0])) < 1e-3 * abs(delta)


def test_geometric_rule_nodes_and_auto_choice(tiny_gpt2, tiny_postnorm):
    nodes, weights = riemann_nodes(20, "geometric")
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)  # exact for a linear g
    assert (nodes > 0).all() and (nodes < 1).all() and (nodes.diff() > 0).all() and (weights > 0).all()
    with pytest.raises(InvalidArgumentError, match="steps >= 2"):
        riemann_nodes(1, "geometric")
    assert resolve_rule(tiny_gpt2, "auto") == "midpoint"
    assert resolve_rule(tiny_postnorm, "auto") == "geometric"
    assert resolve_rule(tiny_postnorm, "left") == "left"
    assert integrated_gradients(tiny_postnorm, PROMPT, "Paris", steps=4).rule == "geometric"


def test_geometric_rule_converges_where_a_post_mlp_norm_defeats_uniform_nodes(tiny_postnorm):
    """With a norm after the MLP and outputs far above its eps scale, g(a) = f(a x) is flat on
    (~1e-3, 1] and steps near a = 0: uniform nodes miss the step entirely (gap = the whole change),
    log-spaced nodes converge at second order."""
    model = copy.deepcopy(tiny_postnorm)
    for block in model.blocks:
        block.mlp.W_out.mul_(1000.0)
    rel = {}
    for rule, m in (("midpoint", 20), ("midpoint", 80), ("geometric", 20), ("geometric", 40), ("geometric", 80)):
        a = integrated_gradients(model, PROMPT, "Paris", steps=m, rule=rule)
        rel[rule, m] = (a.completeness_gap.abs() / (a.prob - a.baseline_probs).abs()).max().item()
    assert rel["midpoint", 20] > 0.9 and rel["midpoint", 80] > 0.9
    assert rel["geometric", 20] < 0.1
    assert rel["geometric", 40] < rel["geometric", 20] / 3 and rel["geometric", 80] < rel["geometric", 40] / 3


def test_completeness_on_factworld(factworld, world):
    model, fact = factworld, world.facts()[0]
    a = integrated_gradients(model, fact.prompt, fact.target, steps=64)
    delta = a.prob - a.baseline_probs
    # Midpoint rule, m = 64: |gap| <= max|g'''| / (24 m^2); checked loosely against the total.
    assert (a.completeness_gap.abs() <= 0.02 * delta.abs() + 1e-5).all(), (a.completeness_gap, delta)


def test_riemann_nodes():
    n, w = riemann_nodes(4, "left")
    assert n.tolist() == [0, 0.25, 0.5, 0.75] and float(w.sum()) == pytest.approx(1)
    n, w = riemann_nodes(4, "midpoint")
    assert n.tolist() == [0.125, 0.375, 0.625, 0.875]
    n, w = riemann_nodes(4, "trapezoid")
    assert len(n) == 5 and float(w.sum()) == pytest.approx(1)
    n, w = riemann_nodes(5, "linspace")
    assert n[0] == 0 and n[-1] == 1 and float(w.sum()) == pytest.approx(1)


# --------------------------------------------------------------------------------------------
# Refinement

def test_refine_share_and_adjust():
    coarse = [[(0, 1), (1, 2)], [(0, 1)], [(0, 1), (2, 3)], [(1, 2)]]
    kept, share, counts = refine(coarse, share=0.8)
    assert kept == [] and counts[(0, 1)] == 3
    kept, _, _ = refine(coarse, share=0.7)  # Dai et al.: shared by >= p x n prompts (3 >= 2.8)
    assert kept == [(0, 1)]
    kept, _, _ = refine(coarse, share=0.5)
    assert kept == [(0, 1), (1, 2)]
    kept, _, _ = refine(coarse, share=0.5, min_shared=3)
    assert kept == [(0, 1)]
    kept, share, _ = refine(coarse, share=0.9, target_count=(1, 2))
    assert kept == [(0, 1)] and share == pytest.approx(0.75)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4)), max_size=6), min_size=1, max_size=6),
       st.floats(0.05, 1.0))
def test_refine_matches_definition(coarse, share):
    kept, _, _ = refine(coarse, share=share)
    n = len(coarse)
    for neuron in {x for c in coarse for x in c}:
        shared = sum(neuron in set(c) for c in coarse)
        assert (neuron in kept) == (shared >= share * n - 1e-9)


def test_knowledge_neurons_end_to_end(tiny_gpt2):
    prompts = ["The capital of France is", "France's capital city is", "The French capital is"]
    kn = knowledge_neurons(tiny_gpt2, prompts, "Paris", steps=3, share=0.6, progress=False)
    assert isinstance(kn, KnowledgeNeurons) and len(kn.attributions) == 3
    for a, (l, n) in [(a, ln) for a in kn.attributions for ln in kn.neurons]:
        assert 0 <= l < 3 and 0 <= n < tiny_gpt2.cfg.d_mlp
    for neuron in kn.neurons:
        assert sum(neuron in a.neurons_above(0.2) for a in kn.attributions) >= 0.6 * 3 - 1e-9
    assert kn.activations.shape[0] == 3 and kn.activations.shape[2] == len(kn.neurons)
    assert len(kn.to_frame()) == len(kn.neurons) > 0  # this seed and share keep some neurons
    assert kn.plot().axes[0].get_ylabel() == "knowledge neurons"
    html = str(kn.show(0))
    assert "<script" in html and "unpkg" not in html and "cdn" not in html.lower()


# --------------------------------------------------------------------------------------------
# Interventions

def test_neuron_effect_matches_hooks(tiny_model):
    neurons = [(0, 3), (2, 7), (2, 11)]
    eff = neuron_effect(tiny_model, [PROMPT, "France's capital city is"], "Paris", neurons=neurons, factor=0.0,
                        n_controls=2)
    prep = teacher_forced(tiny_model, PROMPT, "Paris")
    hooks = scaling_hooks(tiny_model, neurons, 0.0, positions=[prep.last_pos])
    logits = tiny_model.run_with_hooks(prep.tokens[None], fwd_hooks=hooks)
    p = float(logits[0, prep.last_pos].softmax(-1)[prep.target_ids[0]])
    assert float(eff.p_after[0]) == pytest.approx(p, rel=1e-4)
    clean = float(tiny_model(prep.tokens[None])[0, prep.last_pos].softmax(-1)[prep.target_ids[0]])
    assert float(eff.p_before[0]) == pytest.approx(clean, rel=1e-4)
    # Controls: same count per layer, none of the chosen neurons, seeded.
    assert eff.p_control.shape == (2, 2)
    for ctrl in eff.control_neurons:
        assert sorted(l for l, _ in ctrl) == sorted(l for l, _ in neurons)
        assert not set(ctrl) & set(neurons)
    assert random_neurons(tiny_model, neurons, seed=5) == random_neurons(tiny_model, neurons, seed=5)
    assert eff.to_frame().shape[0] == 2 and eff.plot() is not None
    assert isinstance(eff.relative_change, float)


def test_factor_one_changes_nothing_and_all_positions(tiny_gpt2):
    neurons = [(1, 5), (1, 6)]
    same = neuron_effect(tiny_gpt2, [PROMPT], "Paris Hilton", neurons=neurons, factor=1.0, n_controls=0)
    assert torch.allclose(same.p_after, same.p_before, rtol=1e-6, atol=0)
    last = neuron_effect(tiny_gpt2, [PROMPT], "Paris Hilton", neurons=neurons, factor=3.0, positions="last")
    every = neuron_effect(tiny_gpt2, [PROMPT], "Paris Hilton", neurons=neurons, factor=3.0, positions="all")
    assert not torch.allclose(last.p_after, every.p_after, rtol=1e-3, atol=0)


def test_attribution_views(tiny_gpt2):
    import matplotlib.pyplot as plt

    a = integrated_gradients(tiny_gpt2, PROMPT, "Paris", steps=2, progress=False)
    assert a.to_frame().shape == (3 * tiny_gpt2.cfg.d_mlp, 5)
    assert len(a.top(5)) == 5
    assert a.plot().axes[0].get_title().startswith("IG attribution")
    fig, ax = plt.subplots()
    assert a.plot(ax, title="mine") is fig and ax.get_title() == "mine"
    view = a.show()
    assert isinstance(view, HTMLView) and "<script" in str(view) and "unpkg" not in str(view)
    text = repr(a)
    assert text.startswith("NeuronAttribution(prompt='The capital of France is', target='Paris', layers 0, 1, 2")
    assert "tensor" not in text and "\n" not in text
    plt.close("all")


def test_facts_in_results_out(tiny_gpt2):
    """Facts carry their target through knowledge_neurons and neuron_effect; the results print as
    one line and draw on given axes."""
    import matplotlib.pyplot as plt

    prompts = ["The capital of France is", "France's capital city is", "In France, the capital is"]
    facts = [Fact(p, "France", target_true="Paris") for p in prompts]
    kn = knowledge_neurons(tiny_gpt2, facts, steps=3, share=0.3, progress=False)
    same = knowledge_neurons(tiny_gpt2, prompts, "Paris", steps=3, share=0.3, progress=False)
    assert kn.target == "Paris" and kn.neurons == same.neurons and len(kn.neurons) > 0
    assert torch.equal(kn.attributions[0].scores, same.attributions[0].scores)
    layers = ", ".join(str(l) for l in sorted(set(kn.layers)))
    assert repr(kn) == (f"KnowledgeNeurons(target='Paris', {len(kn)} neurons in layers {layers}, 3 prompts, "
                        f"share={kn.share:.2g})")
    eff = neuron_effect(tiny_gpt2, facts, neurons=kn, factor=0.0, n_controls=1)
    assert isinstance(eff, NeuronEffect) and eff.target == "Paris" and eff.neurons == kn.neurons
    assert repr(eff).startswith(f"NeuronEffect(target='Paris', x0 on {len(kn)} neurons") and "tensor" not in repr(eff)
    # the target also comes from the KnowledgeNeurons when the prompts are plain strings
    from_kn = neuron_effect(tiny_gpt2, prompts, neurons=kn, factor=0.0, n_controls=1)
    assert torch.equal(from_kn.p_after, eff.p_after)
    fig, axes = plt.subplots(1, 2)
    assert kn.plot(axes[0], title="kn") is fig and eff.plot(axes[1]) is fig and axes[0].get_title() == "kn"
    assert isinstance(kn.show(kn.neurons[-1]), HTMLView) and "<script" in str(kn.show(0))
    table = eff.show()
    assert isinstance(table, HTMLView) and "<table" in str(table) and "In France, the capital is" in str(table)
    with pytest.raises(InvalidArgumentError):
        kn.show((99, 0))
    plt.close("all")


# --------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(target=""), EmptyTargetError),
        (dict(target="   "), EmptyTargetError),
        (dict(target=None), EmptyTargetError),
        (dict(fact="The capital of France is ", target="Paris"), InvalidArgumentError),  # not tokenizable as given
        (dict(fact=Fact(PROMPT, "France", target_true="Lyon"), target="Paris"), InvalidArgumentError),
        (dict(steps=0), InvalidArgumentError),
        (dict(steps=-3), InvalidArgumentError),
        (dict(layers=[3]), LayerOutOfRangeError),
        (dict(layers=[-4]), LayerOutOfRangeError),
        (dict(layers=[]), InvalidArgumentError),  # empty: selects nothing (not out of range)
        (dict(batch_size=0), InvalidArgumentError),
        (dict(rule="simpson"), InvalidArgumentError),
        (dict(site="mid"), InvalidArgumentError),
        (dict(baseline="mean"), InvalidArgumentError),
        (dict(baseline=torch.zeros(2, 5)), InvalidArgumentError),
    ],
)
def test_integrated_gradients_bad_input(tiny_gpt2, kwargs, error):
    args = dict(fact=PROMPT, target="Paris", steps=2)
    args.update(kwargs)
    with pytest.raises(error) as info:
        integrated_gradients(tiny_gpt2, **args)
    assert isinstance(info.value, KvmemError) and str(info.value)


def test_bad_bags_and_effects(tiny_gpt2):
    facts = [Fact(PROMPT, "France", target_true="Paris"), Fact("Germany's capital is", "Germany", target_true="Berlin")]
    with pytest.raises(InvalidArgumentError):
        knowledge_neurons(tiny_gpt2, facts, progress=False)
    with pytest.raises(InvalidArgumentError):
        knowledge_neurons(tiny_gpt2, [Fact(PROMPT, "France", target_true="Paris")], "Lyon", progress=False)
    with pytest.raises(InvalidArgumentError):
        knowledge_neurons(tiny_gpt2, [], "Paris", progress=False)
    with pytest.raises(InvalidArgumentError):
        knowledge_neurons(tiny_gpt2, [PROMPT], "Paris", share=0.0, progress=False)
    with pytest.raises(EmptyTargetError):
        knowledge_neurons(tiny_gpt2, [PROMPT], None, progress=False)
    with pytest.raises(LayerOutOfRangeError):
        neuron_effect(tiny_gpt2, [PROMPT], "Paris", neurons=[(5, 1)])
    with pytest.raises(LayerOutOfRangeError):
        neuron_effect(tiny_gpt2, [PROMPT], "Paris", neurons=[(1, 10_000)])
    with pytest.raises(InvalidArgumentError):
        neuron_effect(tiny_gpt2, [PROMPT], "Paris", neurons=[(1, 1)], positions="first")
    with pytest.raises(InvalidArgumentError):
        neuron_effect(tiny_gpt2, [PROMPT], "Paris", neurons=[])
    with pytest.raises(InvalidArgumentError):
        neuron_effect(tiny_gpt2, [PROMPT], "Paris", neurons=[(1, 1)], batch_size=0)
