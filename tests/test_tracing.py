"""kvmem.tracing: causal traces equal a plain one-run-per-cell loop; ROME's conventions hold."""

from __future__ import annotations

import types

import pytest
import torch

from kvmem import Fact
from kvmem.errors import InvalidArgumentError, KvmemError, SubjectNotFoundError
from kvmem.core.facts import tokenize_fact
from kvmem.errors import AmbiguousSubjectError
from kvmem.tracing import (
    BUCKETS,
    AverageEffect,
    CausalTrace,
    average_indirect_effect,
    causal_trace,
    noise_level,
    token_buckets,
    trace_all,
)
from kvmem.viz import HTMLView
from reference import naive_trace  # tests/reference.py: ROME's loop, one run_with_hooks per cell


pytestmark = pytest.mark.usefixtures("one_thread")


FACT = Fact("The Eiffel Tower is located in", "Eiffel Tower")


def assert_probs_close(a, b):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("kind,window", [("resid", 1), ("mlp", 1), ("attn", 1), ("mlp", 2), ("attn", 3)])
def test_trace_equals_naive_loop(tiny_model, kind, window):
    got = causal_trace(tiny_model, FACT, kind=kind, window=window, noise=0.5, samples=3, seed=1, batch_size=16)
    scores, p_clean, p_corrupt = naive_trace(tiny_model, FACT, kind, window, 0.5, 3, 1)
    assert got.scores.shape == scores.shape
    assert_probs_close(got.scores, scores)
    assert_probs_close(got.p_clean, p_clean)
    assert_probs_close(got.p_corrupt, p_corrupt)
    assert got.kind == kind and got.window == window and got.correct is None


@pytest.mark.parametrize("sever", ["mlp", "attn"])
def test_severed_trace_equals_naive_loop(tiny_model, sever):
    got = causal_trace(tiny_model, FACT, kind="resid", sever=sever, noise=0.5, samples=2, seed=0)
    scores, _, _ = naive_trace(tiny_model, FACT, "resid", 1, 0.5, 2, 0, sever=sever)
    assert_probs_close(got.scores, scores)
    plain = causal_trace(tiny_model, FACT, kind="resid", noise=0.5, samples=2, seed=0)
    assert not torch.allclose(plain.scores, got.scores)
    # severing never matters for the last layer (nothing above it)
    assert_probs_close(got.scores[-1], plain.scores[-1])


def test_trace_all_shares_runs_and_matches_single_traces(tiny_gated):
    both = trace_all(tiny_gated, FACT, window=2, noise=0.4, samples=2, seed=3)
    assert both.kinds == ("resid", "mlp", "attn")
    for kind in both.kinds:
        single = causal_trace(tiny_gated, FACT, kind=kind, window=1 if kind == "resid" else 2,
                              noise=0.4, samples=2, seed=3)
        assert_probs_close(both[kind].scores, single.scores)
    assert both["resid"].window == 1 and both["mlp"].window == 2


def test_positions_trace_only_those_columns(tiny_model):
    """The subject-last column alone (diagnose's use) and any chosen columns equal the full grid's,
    against the plain per-cell loop; the other cells are NaN."""
    full, p_clean, p_corrupt = naive_trace(tiny_model, FACT, "mlp", 2, 0.4, 2, 3)
    last = causal_trace(tiny_model, FACT, kind="mlp", window=2, noise=0.4, samples=2, seed=3, positions="subject_last")
    s = last.subject.last
    assert_probs_close(last.scores[:, s], full[:, s])
    assert torch.isnan(last.scores[:, [t for t in range(full.shape[1]) if t != s]]).all()
    assert_probs_close(last.p_corrupt, p_corrupt)
    fig = last.plot()  # the untraced (NaN) cells do not blank the colour scale
    vmax = fig.axes[0].collections[0].norm.vmax
    assert vmax == pytest.approx(max(float(last.scores[:, s].max()), last.p_corrupt + 1e-6))
    two = causal_trace(tiny_model, FACT, kind="resid", noise=0.4, samples=2, seed=3, positions=[0, 4])
    ref, _, _ = naive_trace(tiny_model, FACT, "resid", 1, 0.4, 2, 3)
    assert_probs_close(two.scores[:, [0, 4]], ref[:, [0, 4]])
    for bad in ([], [99], [1, 1], "last", [True]):
        with pytest.raises(InvalidArgumentError, match="positions"):
            causal_trace(tiny_model, FACT, kind="mlp", window=1, noise=0.4, samples=2, positions=bad)


def test_zero_noise_gives_clean_everywhere(tiny_model):
    tr = causal_trace(tiny_model, FACT, kind="mlp", window=2, noise=0.0, samples=2)
    assert_probs_close(tr.p_corrupt, tr.p_clean)
    assert_probs_close(tr.scores, torch.full_like(tr.scores, tr.p_clean))


def test_restoring_final_residual_at_last_token_gives_p_clean(tiny_model):
    tr = causal_trace(tiny_model, FACT, kind="resid", samples=4, noise=2.0)
    torch.testing.assert_close(tr.scores[-1, -1].item(), tr.p_clean, rtol=1e-6, atol=0)
    # ... and restoring any state before the subject changes nothing
    before = tr.scores[:, : tr.subject.start]
    torch.testing.assert_close(before, torch.full_like(before, tr.p_corrupt), rtol=1e-6, atol=0)
    assert tr.p_corrupt != tr.p_clean


def test_noise_defaults_to_three_subject_stds(tiny_gpt2):
    facts = [FACT, Fact("Michael Jordan plays the sport of", "Michael Jordan")]
    ids = torch.cat([
        (lambda tf: tf.tokens[tf.subject.start : tf.subject.end])(tokenize_fact(tiny_gpt2, f, target=None))
        for f in facts
    ])
    want = 3 * float(tiny_gpt2.W_E[ids].std())
    assert noise_level(tiny_gpt2, facts) == pytest.approx(want, rel=1e-6)
    default = causal_trace(tiny_gpt2, FACT, samples=2)
    assert default.noise == pytest.approx(noise_level(tiny_gpt2, [FACT]), rel=1e-6)


def test_seed_controls_the_noise(tiny_gpt2):
    a = causal_trace(tiny_gpt2, FACT, kind="mlp", window=1, samples=2, seed=5, noise=0.5)
    b = causal_trace(tiny_gpt2, FACT, kind="mlp", window=1, samples=2, seed=5, noise=0.5)
    c = causal_trace(tiny_gpt2, FACT, kind="mlp", window=1, samples=2, seed=6, noise=0.5)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)


def test_target_sets_answer_and_correctness(tiny_gpt2):
    tr = causal_trace(tiny_gpt2, Fact(FACT.prompt, FACT.subject, "Paris"), samples=1)
    assert tr.answer_id == 6342 and tr.answer == " Paris"
    assert tr.correct is False  # a random model does not know it


def _known_facts(model):
    """Facts whose target is the model's own top token (so a random model 'knows' them)."""
    prompts = [
        ("The Eiffel Tower is located in", "Eiffel Tower"),
        ("Michael Jordan plays the sport of", "Michael Jordan"),
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
        ("Toyota is headquartered in", "Toyota"),
        ("The Space Needle is in downtown", "Space Needle"),
        ("Apple was founded by Steve", "Apple"),
    ]
    known = []
    for prompt, subject in prompts:
        tf = tokenize_fact(model, Fact(prompt, subject), target=None)
        logits = model(tf.tokens[None])[0, -1]
        top = int(logits.argmax())
        text = model.tokenizer.decode([top])
        try:
            fact = Fact(prompt, subject, text)
            if tokenize_fact(model, fact).target_ids[0] == top:
                known.append(fact)
        except KvmemError:
            continue
    return known


def test_average_indirect_effect(tiny_gpt2):
    known = _known_facts(tiny_gpt2)
    assert len(known) >= 2
    known = known[:2]
    wrong = Fact("The Eiffel Tower is located in", "Eiffel Tower", "Paris")
    facts = known + [wrong]
    noise = noise_level(tiny_gpt2, facts)
    res = average_indirect_effect(tiny_gpt2, facts, window=2, samples=2, seed=4, progress=False)
    # the default in a notebook: a progress bar over the facts, counting each once
    shown = average_indirect_effect(tiny_gpt2, facts, window=2, samples=2, seed=4, progress=True)
    assert torch.equal(shown.aie, res.aie)
    assert isinstance(res, AverageEffect)
    assert res.n_facts == 2 and res.n_skipped == 1 and res.noise == pytest.approx(noise)
    assert res.aie.shape == (3, len(BUCKETS), tiny_gpt2.cfg.n_layers)
    # equals averaging trace_all over the known facts: per fact the mean over the bucket's tokens,
    # then the mean over the facts that have the bucket (ROME's weighting)
    sums = torch.zeros_like(res.aie, dtype=torch.float64)
    counts = torch.zeros(len(BUCKETS))
    for fact in known:
        ts = trace_all(tiny_gpt2, fact, window=2, noise=noise, samples=2, seed=4)
        tr0 = ts["resid"]
        for b, positions in enumerate(token_buckets(tr0.subject, len(tr0.str_tokens))):
            if not positions:
                continue
            counts[b] += 1
            for k, kind in enumerate(res.kinds):
                per_token = [(ts[kind].scores[:, p] - ts[kind].p_corrupt).double() for p in positions]
                sums[k, b] += sum(per_token) / len(per_token)
    assert torch.equal(res.counts.float(), counts)
    want = (sums / counts[None, :, None].double()).float()
    torch.testing.assert_close(res.aie, want, rtol=1e-4, atol=1e-9, equal_nan=True)
    frame = res.to_frame()
    assert len(frame) == 3 * len(BUCKETS) * tiny_gpt2.cfg.n_layers
    assert res["mlp"].shape == (len(BUCKETS), tiny_gpt2.cfg.n_layers)
    fig = res.plot()
    assert len(fig.axes) == 3


def test_average_indirect_effect_resumes(tiny_gpt2, tmp_path):
    """A run log: an interrupted run continues without redoing finished facts and gives the same
    average; other settings refuse to resume."""
    from kvmem.runs import RunLogError

    facts = _known_facts(tiny_gpt2)[:3] + [Fact("The Eiffel Tower is located in", "Eiffel Tower", "Paris")]
    kw = dict(window=2, samples=2, seed=1, noise=0.4, progress=False)
    full = average_indirect_effect(tiny_gpt2, facts, **kw)
    log = tmp_path / "aie.jsonl"
    average_indirect_effect(tiny_gpt2, facts[:2], log=str(log), **kw)
    with open(log, "a") as f:
        f.write('{"key": "cut off by an interrup')  # a line the interruption left half-written
    calls = []
    from kvmem.tracing import average

    orig = average.trace_prepared

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    average.trace_prepared = counting  # the name average_indirect_effect calls per traced fact
    try:
        resumed = average_indirect_effect(tiny_gpt2, facts, log=str(log), **kw)
    finally:
        average.trace_prepared = orig
    assert len(calls) == sum(1 for f in facts[2:] if _knows(tiny_gpt2, f))
    torch.testing.assert_close(resumed.aie, full.aie, equal_nan=True)
    assert (resumed.n_facts, resumed.n_skipped) == (full.n_facts, full.n_skipped)
    with pytest.raises(RunLogError, match="samples"):
        average_indirect_effect(tiny_gpt2, facts, log=str(log), **{**kw, "samples": 3})
    restarted = average_indirect_effect(tiny_gpt2, facts, log=str(log), restart=True, **kw)
    torch.testing.assert_close(restarted.aie, full.aie, equal_nan=True)


def _knows(model, fact):
    tf = tokenize_fact(model, fact)
    return int(model(tf.tokens[None])[0, -1].argmax()) == tf.target_ids[0]


def test_token_buckets():
    from kvmem.core.facts import SubjectSpan

    # BOS The E iff el Tower is located in -> subject 2..5, last 8
    assert token_buckets(SubjectSpan(2, 6, True), 9) == ((2,), (3, 4), (5,), (6,), (7,), (8,))
    # one-token subject right before the last token
    assert token_buckets(SubjectSpan(1, 2, True), 3) == ((1,), (), (1,), (2,), (), (2,))


def test_views(tiny_gpt2):
    ts = trace_all(tiny_gpt2, FACT, samples=2, noise=0.5)
    tr = ts["mlp"]
    assert isinstance(tr, CausalTrace)
    frame = tr.to_frame()
    assert len(frame) == tr.scores.numel()
    assert set(frame.columns) >= {"kind", "layer", "position", "token", "is_subject", "score", "indirect_effect"}
    assert frame["is_subject"].sum() == len(tr.subject) * tr.n_layers
    fig = tr.plot()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[tr.subject.start].endswith("*") and not labels[0].endswith("*")
    assert len(ts.plot().axes) >= 3
    html = ts.show()
    assert isinstance(html, HTMLView)
    assert "unpkg.com" not in str(html) and "CircuitsVis.render" in str(html)
    assert len(ts.to_frame()) == 3 * tr.scores.numel()
    import matplotlib.pyplot as plt

    plt.close("all")


def test_plots_draw_on_given_axes(tiny_gpt2):
    """`plot(ax=None, *, title=None)`: a new figure by default, else the caller's axes (one per
    panel); a wrong number of axes is a clear error."""
    import matplotlib.pyplot as plt

    ts = trace_all(tiny_gpt2, FACT, window=1, samples=1, noise=0.5, progress=False)
    fig, axes = plt.subplots(1, 3)
    assert ts.plot(axes, title="three kinds") is fig and fig._suptitle.get_text() == "three kinds"
    assert [a.get_title() for a in axes][1].endswith("MLP after corrupted input")
    fig1, ax1 = plt.subplots()
    assert ts["attn"].plot(ax1, title="attention") is fig1 and ax1.get_title() == "attention"
    with pytest.raises(InvalidArgumentError, match="3 panel"):
        ts.plot(ax1)
    with pytest.raises(InvalidArgumentError, match="1 panel"):
        ts["mlp"].plot(list(axes))
    plt.close("all")


def test_bad_input(tiny_gpt2):
    with pytest.raises(SubjectNotFoundError):
        causal_trace(tiny_gpt2, Fact("The Eiffel Tower is in", "Louvre"))
    with pytest.raises(AmbiguousSubjectError):
        causal_trace(tiny_gpt2, Fact("Paris is the capital; Paris is in", "Paris"))
    with pytest.raises(InvalidArgumentError):
        causal_trace(tiny_gpt2, FACT, kind="mlp", window=4)  # 3 layers
    with pytest.raises(InvalidArgumentError):
        causal_trace(tiny_gpt2, FACT, kind="mlp", window=0)
    with pytest.raises(InvalidArgumentError):
        causal_trace(tiny_gpt2, FACT, kind="embed")
    with pytest.raises(InvalidArgumentError):
        causal_trace(tiny_gpt2, FACT, samples=0)
    with pytest.raises(KvmemError):
        causal_trace(tiny_gpt2, FACT, noise=-1.0)
    with pytest.raises(InvalidArgumentError):
        causal_trace(tiny_gpt2, FACT, kind="mlp", sever="attn")
    with pytest.raises(InvalidArgumentError):
        trace_all(tiny_gpt2, FACT, window=9)
    with pytest.raises(KvmemError):
        average_indirect_effect(tiny_gpt2, [FACT], progress=False)  # no target to check
    no_embed = types.SimpleNamespace(cfg=tiny_gpt2.cfg, tokenizer=tiny_gpt2.tokenizer, hook_dict={})
    with pytest.raises(InvalidArgumentError, match="hook_embed"):
        causal_trace(no_embed, FACT)
    with pytest.raises(InvalidArgumentError, match="hook_embed"):
        noise_level(no_embed, [FACT])


# --------------------------------------------------------------------------------------------
# The trained factworld model (the shared fixtures in conftest.py)


@pytest.fixture(scope="module")
def world_facts(world):
    return [Fact(f.prompt, f.subject, f.target_true) for f in world.facts()[:40]]


def test_factworld_trace_recovers_the_fact(factworld, world_facts):
    model, facts = factworld, world_facts
    def knows(f):
        tf = tokenize_fact(model, f)
        return int(model(tf.tokens[None])[0, -1].argmax()) == tf.target_ids[0]

    known = [f for f in facts if knows(f)][:1]
    assert known, "the factworld model answers none of its first 40 training facts"
    fact = known[0]
    ts = trace_all(model, fact, window=min(3, model.cfg.n_layers), samples=4)
    res = ts["resid"]
    assert res.correct and res.p_clean > res.p_corrupt
    # On the trained model this identity holds to 7e-5 relative (1e-6 on the tiny random models);
    # where the residual difference comes from is not yet known.
    torch.testing.assert_close(res.scores[-1, -1].item(), res.p_clean, rtol=1e-4, atol=0)
    # Restoring the residual at the subject's LAST token alone brings back a good part of the answer
    # (measured: 30% of p_clean - p_corrupt on this fact; factworld is trained so recall goes through
    # that token, as ROME finds in GPT-2); restoring its first token brings back nothing.
    span = tokenize_fact(model, fact).subject
    gap = res.p_clean - res.p_corrupt
    last = float(res.scores[:, span.end - 1].max()) - res.p_corrupt
    first = float(res.scores[:, span.start].max()) - res.p_corrupt
    assert last > 0.2 * gap and last > first + 0.1 * gap, (last, first, gap)
    naive, _, _ = naive_trace(model, fact, "mlp", min(3, model.cfg.n_layers), ts.traces[1].noise, 4, 0)
    # The trained model's sharp logits turn fp32 reordering (KV-cache path vs full forward) into
    # ~7e-5 relative differences in probability; the tiny random models agree to 2e-5.
    torch.testing.assert_close(ts["mlp"].scores.float(), torch.as_tensor(naive).float(), rtol=2e-4, atol=1e-7)


def test_factworld_average_indirect_effect(factworld, world_facts):
    """Facts the model answers are traced, a fact it gets wrong is skipped, and the effects sit
    where factworld's training put recall (kvmem/factworld/train.py, the subject funnel): the
    layer-0 MLP at the last subject token (the early site) and last-layer attention at the last
    token (the late site). A one-layer window pins the layer. Measured with 3 samples: MLP 0.41 at
    layer 0, under 0.01 above; attention 0.89 at layer 3 (benchmarks/results/tracing/aie_factworld.md:
    200 facts, window 2, the same sites)."""
    model = factworld
    answered = world_facts[:8]
    spare = world_facts[8]
    wrong_target = next(f.target_true for f in world_facts if f.target_true != spare.target_true)
    wrong = Fact(spare.prompt, spare.subject, wrong_target)
    assert tokenize_fact(model, wrong).target_ids[0] != tokenize_fact(model, spare).target_ids[0]
    res = average_indirect_effect(model, [*answered, wrong], window=1, samples=3, progress=False)
    assert (res.n_facts, res.n_skipped) == (8, 1)  # factworld answers all of its first 40 facts
    assert res.counts[BUCKETS.index("last subject token")] == 8
    assert res.total_effect > 0.5, (res.p_clean, res.p_corrupt)
    mlp = res["mlp"][BUCKETS.index("last subject token")]
    assert int(mlp.argmax()) == 0 and mlp[0] > 0.25 and (mlp[1:] < 0.1).all(), mlp
    assert mlp[0] > 4 * res["mlp"][BUCKETS.index("first subject token")].abs().max()
    attn = res["attn"][BUCKETS.index("last token")]
    assert int(attn.argmax()) == model.cfg.n_layers - 1 and attn[-1] > 0.5, attn


def test_factworld_default_windows_come_from_config(factworld, world_facts):
    """Without `window`, MLP and attention restore `kvmem.config.trace_window` layers (2 of
    factworld's 4) and the residual one: the same traces as passing those windows."""
    from kvmem import config

    model, fact = factworld, world_facts[0]
    w = config.trace_window(model.cfg.n_layers)
    assert w == 2
    ts = trace_all(model, fact, samples=1, progress=False)
    assert [t.window for t in ts] == [1, w, w]
    explicit = trace_all(model, fact, window=w, samples=1, progress=False)
    for a, b in zip(ts, explicit):
        assert torch.equal(a.scores, b.scores)
    mlp = causal_trace(model, fact, kind="mlp", samples=1, progress=False)
    assert mlp.window == w
    assert_probs_close(mlp.scores, ts["mlp"].scores)  # batched with other kinds: fp32 reordering only
    assert causal_trace(model, fact, samples=1, progress=False).window == 1
