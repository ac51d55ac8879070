"""Key-value memory analyses (Geva et al.) on tiny random models, and on the trained factworld model."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from kvmem.errors import InvalidArgumentError, KvmemError, LayerOutOfRangeError  # noqa: E402
from kvmem.data import builtin_facts  # noqa: E402
from kvmem.memories import (  # noqa: E402
    composition_stats,
    corpus_windows,
    fact_memories,
    key_value_agreement,
    TopContexts,
    ValueTokens,
    memory_coefficients,
    memory_sum,
    readout_logits,
    top_contexts,
    top_contexts_by_layer,
    value_directions,
    value_tokens,
)
from kvmem.core.tokenize import encode  # noqa: E402
from kvmem.core.weights import norm_centres, norm_gain  # noqa: E402
from kvmem.viz import HTMLView  # noqa: E402


DOCS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Michael Jordan played basketball for the Chicago Bulls for many years.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog again and again.",
    "Tokyo is the capital of Japan and one of the largest cities in the world.",
    "In 1969, astronauts landed on the Moon for the first time.",
    "Shakespeare wrote Hamlet, Macbeth and many other plays.",
]


@pytest.fixture(params=["gpt2", "gated", "postnorm"])
def any_model(request):
    name = {"gpt2": "tiny_gpt2", "gated": "tiny_gated", "postnorm": "tiny_postnorm"}[request.param]
    return request.getfixturevalue(name)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run far faster single-threaded on a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- the decomposition itself ----------------------------------------------------------------


def test_norm_gain_and_centring_are_what_the_norms_compute(any_model):
    """kvmem.core.weights.norm_gain / norm_centres against the norm modules themselves: each norm's
    output equals its input (centred for LayerNorm) / its hook_scale x the gain (no bias here)."""
    model = any_model
    tokens = torch.tensor([encode(model, DOCS[0])])
    _, cache = model.run_with_cache(tokens)
    norms = [("ln_final", model.ln_final)] + [
        (f"blocks.{l}.ln2_post", model.blocks[l].ln2_post) for l in range(model.cfg.n_layers)
        if getattr(model.blocks[l], "ln2_post", None) is not None
    ]
    for name, norm in norms:
        x = torch.randn(2, 3, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
        got = norm(x)
        if norm_centres(model, norm):
            x = x - x.mean(-1, keepdim=True)
        rms = (x.pow(2).mean(-1, keepdim=True) + getattr(model.cfg, "eps", 1e-5)).sqrt()
        gain = norm_gain(model, norm)
        expect = x / rms * (1.0 if gain is None else gain)
        torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-3, msg=name)


def _b_out(model, layer):
    """The MLP's output bias; zeros where the MLP has none (a bridge's bias-free Llama/Gemma MLP)."""
    b = model.blocks[layer].mlp.b_out
    return torch.zeros(model.cfg.d_model) if b is None else b


def test_memories_sum_to_mlp_out(any_model):
    model = any_model
    a, b = encode(model, DOCS[0]), encode(model, DOCS[1])
    n = min(len(a), len(b))
    tokens = torch.tensor([a[:n], b[:n]])
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        coef = memory_coefficients(model, tokens, layer)
        torch.testing.assert_close(coef, cache[f"blocks.{layer}.mlp.hook_post"])
        out = memory_sum(model, coef, layer)
        torch.testing.assert_close(out, cache[f"blocks.{layer}.hook_mlp_out"], atol=1e-5, rtol=1e-4)
        b = _b_out(model, layer)
        pre = memory_sum(model, coef, layer, post_norm=False)
        torch.testing.assert_close(memory_sum(model, coef, layer, bias=False, post_norm=False) + b, pre)
        if getattr(model.blocks[layer], "ln2_post", None) is not None:
            # Gemma-like: hook_mlp_out = ln2_post(sum + b_out); each memory writes c_i * W_out[i] * w / scale.
            scale = cache[f"blocks.{layer}.ln2_post.hook_scale"]
            direct = (coef @ value_directions(model, layer) + b * norm_gain(model, model.blocks[layer].ln2_post)) / scale
            torch.testing.assert_close(direct, out, atol=1e-5, rtol=1e-4)


# --- values -> vocabulary ---------------------------------------------------------------------


def test_value_tokens_matches_full_projection_and_chunks(any_model):
    model = any_model
    W_out = value_directions(model, 1)
    full = readout_logits(model, W_out)
    vt = value_tokens(model, 1, k=7, max_elements=3 * model.cfg.d_vocab)  # 3 neurons per chunk
    torch.testing.assert_close(vt.top_scores, full.topk(7, -1).values)
    assert torch.equal(vt.top_ids, full.topk(7, -1).indices)
    torch.testing.assert_close(vt.bottom_scores, full.topk(7, -1, largest=False).values)
    raw = value_tokens(model, 1, neurons=[5, 2], k=3, final_norm="none")
    assert torch.equal(raw.top_ids, (W_out[[5, 2]] @ model.W_U).topk(3, -1).indices)
    assert raw.neurons.tolist() == [5, 2]
    frame = vt.to_frame(neurons=[0, 1])
    assert list(frame["neuron"]) == [0, 1] and len(frame["top_tokens"][0]) == 7
    html = vt.show(n=3)
    assert isinstance(html, HTMLView) and str(html).count("<tr><td>") == 3
    assert str(vt.show(neurons=[5])).count("<tr><td>") == 1


def test_value_readout_is_the_linearised_final_norm(tiny_gpt2):
    # Unfolded LayerNorm: centre, times the norm's gain, then W_U (no b_U, no 1/scale).
    model = tiny_gpt2
    v = model.blocks[0].mlp.W_out[:4]
    expect = ((v - v.mean(-1, keepdim=True)) * model.ln_final.w) @ model.W_U
    torch.testing.assert_close(readout_logits(model, v), expect)


# --- keys -> top contexts -----------------------------------------------------------------------


def _brute_force(model, docs, layer, k, window):
    batches = list(corpus_windows(model, docs, window=window, batch_size=10_000))
    assert len(batches) == 1
    b = batches[0]
    acts = memory_coefficients(model, b.tokens, layer)  # (rows, pos, d_mlp)
    acts = acts.masked_fill(~b.valid[..., None], float("-inf"))
    flat = acts.reshape(-1, acts.shape[-1]).T
    vals, idx = flat.topk(k, dim=-1)
    T = b.tokens.shape[1]
    return vals, idx // T, idx % T, b


@pytest.mark.parametrize("window,batch_size", [(12, 2), (9, 3)])
def test_streaming_top_k_equals_brute_force(tiny_model, window, batch_size):
    model, k, layer = tiny_model, 6, 1
    tc = top_contexts(model, DOCS, layer, k=k, window=window, batch_size=batch_size, progress=False)
    vals, rows, pos, b = _brute_force(model, DOCS, layer, k, window)
    torch.testing.assert_close(tc.coefficients, vals)
    assert torch.equal(tc.rows, rows) and torch.equal(tc.positions, pos)
    # Stored contexts and next tokens agree with the windows the model saw.
    for j in range(0, model.cfg.d_mlp, 7):
        for s in range(k):
            r, p = int(rows[j, s]), int(pos[j, s])
            ctx = [int(i) for i in tc.contexts[j, s] if int(i) >= 0]
            assert ctx == b.tokens[r, : p + 1].tolist()
            assert int(tc.next_tokens[j, s]) == int(b.next_tokens[r, p])
    assert tc.n_tokens == sum(len(encode(model, d, prepend_bos=False)) for d in DOCS) + len(DOCS) - 1


def test_top_contexts_subset_neurons_short_context_and_layers(tiny_gpt2):
    model = tiny_gpt2
    by_layer = top_contexts_by_layer(model, DOCS, layers=[0, 2], neurons=[3, 10], k=4, window=16, context=5, progress=False)
    assert sorted(by_layer) == [0, 2]
    full = top_contexts(model, DOCS, 2, k=4, window=16, progress=False)
    tc = by_layer[2]
    torch.testing.assert_close(tc.coefficients, full.coefficients[[3, 10]])
    assert tc.contexts.shape == (2, 4, 5)
    assert torch.equal(tc.contexts[..., -5:], full.contexts[[3, 10]][..., -5:])
    frame = tc.to_frame(n=2)
    assert len(frame) == 4 and set(frame["neuron"]) == {3, 10}


def test_window_stream_reads_next_token_across_windows(tiny_gpt2):
    model = tiny_gpt2
    batches = list(corpus_windows(model, DOCS, window=8, batch_size=2))
    toks = torch.cat([b.tokens[:, 1:] for b in batches]).reshape(-1)  # drop start tokens
    nxt = torch.cat([b.next_tokens[:, 1:] for b in batches]).reshape(-1)
    valid_len = sum(b.n_tokens for b in batches)
    assert torch.equal(nxt[: valid_len - 1], toks[1:valid_len])
    assert int(nxt[valid_len - 1]) == -1
    capped = list(corpus_windows(model, DOCS, window=8, batch_size=2, max_tokens=20))
    assert sum(b.n_tokens for b in capped) == 20


def test_state_does_not_grow_with_the_corpus(tiny_gpt2):
    small = top_contexts(tiny_gpt2, DOCS, 1, k=4, window=16, progress=False)
    big = top_contexts(tiny_gpt2, DOCS * 6, 1, k=4, window=16, progress=False)
    assert big.n_tokens > 5 * small.n_tokens
    for name in ("coefficients", "contexts", "next_tokens", "rows", "positions"):
        assert getattr(big, name).shape == getattr(small, name).shape
    assert (big.coefficients >= small.coefficients).all()  # more text, higher top-k (same prefix)


def test_fewer_positions_than_k_leaves_empty_slots(tiny_gpt2):
    tc = top_contexts(tiny_gpt2, ["One two three."], 0, k=10, window=16, progress=False)
    n = tc.n_tokens
    assert torch.isfinite(tc.coefficients[:, :n]).all()
    assert torch.isinf(tc.coefficients[:, n:]).all() and (tc.rows[:, n:] == -1).all()
    assert len(tc.examples(0)) == n


def test_key_view_is_offline(tiny_gpt2):
    tc = top_contexts(tiny_gpt2, DOCS, 1, k=3, window=16, progress=False)
    view = tc.show(tiny_gpt2, neuron=4, n=3)
    assert isinstance(view, HTMLView)
    html = str(view)
    assert "unpkg.com" not in html and "cdn" not in html.lower()[:5000]
    assert "coef=" in html and "L1.N4" in html
    assert "L1.N0" in str(tc.show(tiny_gpt2, n=1))  # default: the result's first neuron


# --- agreement ---------------------------------------------------------------------------------


def _fake(layer, nexts, tops, d_vocab=50257):
    n = len(nexts)
    tc = TopContexts(
        layer=layer,
        neurons=torch.arange(n),
        coefficients=torch.ones(n, 2),
        contexts=torch.zeros(n, 2, 3, dtype=torch.long),
        next_tokens=torch.tensor(nexts),
        rows=torch.zeros(n, 2, dtype=torch.long),
        positions=torch.zeros(n, 2, dtype=torch.long),
        n_tokens=100,
        window=8,
    )
    top = torch.tensor(tops)
    vt = ValueTokens(layer, torch.arange(n), top, torch.ones_like(top, dtype=torch.float), top, torch.ones_like(top, dtype=torch.float), "linear")
    return tc, vt


def test_agreement_counts_exactly(tiny_gpt2):
    # 4 memories: next tokens of the top-2 triggers, and each value's top-2 tokens.
    tc, vt = _fake(0, [[5, 5], [7, 9], [1, 2], [3, 3]], [[5, 0], [8, 7], [2, 4], [6, 6]])
    ag = key_value_agreement(tiny_gpt2, [tc], [vt], k_values=2, n_shuffles=50)
    assert float(ag.agreement[0]) == 0.25  # memory 0 only
    assert float(ag.agreement_all[0]) == 3 / 8  # (0, slot 0), (0, slot 1), (2, slot 1)
    assert float(ag.in_value_topk[0]) == 0.5  # memories 0 and 1
    assert 0 <= float(ag.shuffled[0]) <= 0.25
    assert ag.uniform == pytest.approx(1 / tiny_gpt2.cfg.d_vocab)
    assert list(ag.to_frame()["layer"]) == [0]
    fig = ag.plot(title="agreement")
    assert fig.axes[0].get_title() == "agreement"


def test_agreement_end_to_end(tiny_gpt2):
    tcs = top_contexts_by_layer(tiny_gpt2, DOCS, k=3, window=16, progress=False)
    ag = key_value_agreement(tiny_gpt2, tcs, k_values=5)
    # A memory whose top trigger is the corpus's last token has no next token and is not counted.
    assert ag.layers == (0, 1, 2) and (ag.n_memories >= 0.8 * tiny_gpt2.cfg.d_mlp).all()
    assert ((ag.agreement >= 0) & (ag.agreement <= 1)).all()


# --- composition and refinement ----------------------------------------------------------------


def test_composition_stats(tiny_model):
    model = tiny_model
    comp = composition_stats(model, DOCS, max_tokens=200, window=16, positions_per_window=3, progress=False)
    L = model.cfg.n_layers
    assert comp.layers == tuple(range(L)) and comp.n_positions > 0
    # The residual after the last layer *is* the final residual.
    assert float(comp.post_matches_final[-1]) == 1.0
    torch.testing.assert_close(comp.kept + comp.override + comp.compose, torch.ones(L, dtype=torch.float64))
    assert ((comp.n_active >= 1) & (comp.n_active <= model.cfg.d_mlp)).all()
    assert ((comp.compositional >= 0) & (comp.compositional <= 1)).all()
    full = composition_stats(model, DOCS, max_tokens=200, window=16, positions_per_window=3, mass=1.0, progress=False)
    assert (full.n_active >= comp.n_active).all()
    assert len(comp.to_frame()) == L
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    assert comp.plot(axes, title="composition") is fig and fig._suptitle.get_text() == "composition"
    with pytest.raises(InvalidArgumentError, match="2 panel"):
        comp.plot(axes[0])  # two panels need two axes
    plt.close("all")


# --- fact view -------------------------------------------------------------------------------


def test_fact_view_sums_to_direct_logit_attribution(any_model):
    model = any_model
    fact = builtin_facts()[3]  # "The capital of France is" -> Paris
    fm = fact_memories(model, fact, k=5)
    from kvmem.core.facts import tokenize_fact

    tf = tokenize_fact(model, fact)
    _, cache = model.run_with_cache(tf.tokens[None])
    gold = tf.target_ids[0]
    last, subj = tf.last_pos, tf.subject.last
    for li, layer in enumerate(fm.layers):
        b = _b_out(model, layer)
        if getattr(model.blocks[layer], "ln2_post", None) is not None:  # b_out sits inside the post-norm
            b = b * norm_gain(model, model.blocks[layer].ln2_post) / cache[f"blocks.{layer}.ln2_post.hook_scale"][0]
        mlp = cache[f"blocks.{layer}.hook_mlp_out"][0] - b
        for p, pos in enumerate((subj, last)):
            # Direct logit attribution of the MLP output (without b_out) at this position.
            x = mlp[pos]
            if norm_centres(model, model.ln_final):
                x = x - x.mean()
            gain = norm_gain(model, model.ln_final)
            x = x / cache["ln_final.hook_scale"][0, pos, 0] * (1.0 if gain is None else gain)
            dla = x @ model.W_U[:, gold]
            torch.testing.assert_close(fm.total[li, p], dla, atol=1e-4, rtol=1e-3)
        assert (fm.push[li, :, :-1] >= fm.push[li, :, 1:]).all()  # sorted
    assert fm.positions == (subj, last)
    assert len(fm.to_frame()) == model.cfg.n_layers * 2 * 5
    assert fm.top_memories(3)[0][2] == float(fm.push[:, 0, 0].max())
    fm.plot()
    assert "<table>" in str(fm.show(n=3))


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m: top_contexts(m, [], 0, progress=False),
        lambda m: top_contexts(m, ["   ", ""], 0, progress=False),
        lambda m: top_contexts(m, DOCS, 3, progress=False),
        lambda m: top_contexts(m, DOCS, -4, progress=False),
        lambda m: top_contexts(m, DOCS, 0, k=0, progress=False),
        lambda m: top_contexts(m, DOCS, 0, neurons=[64], progress=False),
        lambda m: top_contexts(m, DOCS, 0, window=1, progress=False),
        lambda m: top_contexts(m, DOCS, 0, window=65, progress=False),
        lambda m: top_contexts(m, "/no/such/file.txt", 0, progress=False),
        lambda m: value_tokens(m, 5),
        lambda m: value_tokens(m, 0, k=0),
        lambda m: value_tokens(m, 0, neurons=[-1]),
        lambda m: value_tokens(m, 0, final_norm="full"),
        lambda m: composition_stats(m, [], progress=False),
        lambda m: composition_stats(m, DOCS, mass=0.0, progress=False),
        lambda m: fact_memories(m, builtin_facts()[0], layers=[7]),
        lambda m: fact_memories(m, builtin_facts()[0], k=0),
        lambda m: key_value_agreement(m, {}),
    ],
)
def test_bad_input_raises_kvmem_error(tiny_gpt2, call):
    with pytest.raises(KvmemError) as e:
        call(tiny_gpt2)
    assert len(str(e.value)) > 15


def test_layer_error_type(tiny_gpt2):
    with pytest.raises(LayerOutOfRangeError, match="0..2"):
        top_contexts(tiny_gpt2, DOCS, 3, progress=False)
    # an empty choice of layers is a bad argument (as in kvmem.neurons), not a layer out of range
    for call in (lambda: top_contexts_by_layer(tiny_gpt2, DOCS, [], progress=False),
                 lambda: composition_stats(tiny_gpt2, DOCS, [], progress=False),
                 lambda: fact_memories(tiny_gpt2, builtin_facts()[0], layers=[])):
        with pytest.raises(InvalidArgumentError, match="layers is empty"):
            call()


# --- factworld: ground truth ----------------------------------------------------------------------


def _world_facts(world, n):
    from kvmem.core.facts import Fact

    facts = world.facts()
    step = max(1, len(facts) // n)  # spread over relations
    return [Fact(f.prompt, f.subject, target_true=f.target, relation_id=f.relation) for f in facts[::step][:n]]


def test_factworld_top_memories_values_promote_the_object(factworld, world):
    """The values of the memories that push a known fact's object most (at the last token)
    rank that object far higher, in their own vocabulary projection, than random memories'
    values of the same layers do. Measured over facts the model gets right."""
    model = factworld
    from kvmem.recall import fact_recall

    torch.manual_seed(0)
    facts = _world_facts(world, 60)
    known = [f for f, ok in zip(facts, fact_recall(model, facts).known.tolist()) if ok][:20]
    assert len(known) >= 5, "the factworld model knows fewer than 5 of 60 of its training facts"
    gen = torch.Generator().manual_seed(0)
    top_ranks, rand_ranks = [], []
    for fact in known:
        fm = fact_memories(model, fact, k=5)
        for layer, neuron, _ in fm.top_memories(5, position="last"):
            logits = readout_logits(model, model.blocks[layer].mlp.W_out[[neuron]])[0]
            li = fm.layers.index(layer)
            j = int((fm.neurons[li, 1] == neuron).nonzero()[0, 0])
            sign = 1.0 if float(fm.coefficients[li, 1, j]) >= 0 else -1.0
            logits = logits * sign
            top_ranks.append(int((logits > logits[fm.target_id]).sum()))
            rn = int(torch.randint(model.cfg.d_mlp, (1,), generator=gen))
            rl = readout_logits(model, model.blocks[layer].mlp.W_out[[rn]])[0]
            rand_ranks.append(int((rl > rl[fm.target_id]).sum()))
    top_med = float(torch.tensor(top_ranks, dtype=torch.float).median())
    rand_med = float(torch.tensor(rand_ranks, dtype=torch.float).median())
    d_vocab = model.cfg.d_vocab
    assert top_med < 0.02 * d_vocab, (top_med, rand_med)
    assert top_med * 10 < rand_med, (top_med, rand_med)
