"""ROME editing: statistics (exact, cached, invalidated), the rank-one update's algebra, exact
restoration, saved edits, and bad input (clear KvmemError, model unchanged)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_tiny

from kvmem.editing import (
    Edit,
    ModelMismatchError,
    RomeHparams,
    SingularStatisticsError,
    apply_edit,
    compute_rome_edit,
    context_prefixes,
    edited,
    model_fingerprint,
    reinsert,
    second_moment,
)
from kvmem.errors import (
    CacheError,
    EmptyTargetError,
    InvalidArgumentError,
    KvmemError,
    LayerOutOfRangeError,
    SubjectNotFoundError,
)
from kvmem.core.facts import Fact
from kvmem.core.tokenize import encode
from reference import ENGLISH_SENTENCES  # tests/reference.py

LAYER = 1
FAST = RomeHparams(prefixes=((4, 2),), v_num_grad_steps=4, seed=0)
CORPUS = ENGLISH_SENTENCES * 8
REQUEST = Fact(
    "The Eiffel Tower is located in the city of", "The Eiffel Tower", target_true="Paris", target_new="Rome"
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stats_for(tmp_path_factory):
    cache = tmp_path_factory.mktemp("kvmem-cache")
    memo = {}

    # keep the model itself in the memo: an id() alone can be reused by the next parametrized model
    def get(model):
        key = id(model)
        if key not in memo or memo[key][0] is not model:
            memo[key] = (model, second_moment(model, LAYER, CORPUS, n_tokens=600, cache_dir=cache, progress=False))
        return memo[key][1]

    return get


@pytest.fixture(scope="module")
def edit_for(stats_for):
    memo = {}

    def get(model):
        key = id(model)
        if key not in memo or memo[key][0] is not model:
            memo[key] = (model, compute_rome_edit(model, REQUEST, layer=LAYER, stats=stats_for(model), hparams=FAST))
        return memo[key][1]

    return get


def _keys(model, texts):
    out = []
    for t in texts:
        _, cache = model.run_with_cache(torch.tensor([encode(model, t)]), names_filter=f"blocks.{LAYER}.mlp.hook_post")
        out.append(cache[f"blocks.{LAYER}.mlp.hook_post"][0, 1:])  # no start token
    return torch.cat(out).double()


# --- statistics ----------------------------------------------------------------------------

def test_second_moment_equals_direct_computation(tiny_model, tmp_path):
    with pytest.warns(UserWarning, match="only"):
        sm = second_moment(tiny_model, LAYER, CORPUS[:6], n_tokens=10_000, cache_dir=tmp_path, progress=False)
    K = _keys(tiny_model, CORPUS[:6])
    assert sm.n_tokens == K.shape[0]  # the corpus is shorter than asked for: all of it, counted exactly
    torch.testing.assert_close(sm.C, K.T @ K / K.shape[0], rtol=1e-5, atol=1e-7)
    assert sm.C.dtype == torch.float64 and sm.eigmax >= sm.eigmin


def test_second_moment_counts_exactly_n_tokens_and_reports_convergence(tiny_gpt2, tmp_path):
    sm = second_moment(tiny_gpt2, LAYER, CORPUS, n_tokens=500, cache_dir=tmp_path, n_checkpoints=5, progress=False)
    assert sm.n_tokens == 500
    conv = sm.convergence()
    assert list(conv.columns) == ["tokens_seen", "rel_change"] and len(conv) >= 2
    assert conv["tokens_seen"].is_monotonic_increasing and conv["tokens_seen"].iloc[-1] == 500


def test_stats_cache_is_keyed_by_weights_layer_and_corpus(tiny_gpt2, tmp_path):
    model = build_tiny("gpt2")  # a fresh model with the same weights
    a = second_moment(model, LAYER, CORPUS, n_tokens=300, cache_dir=tmp_path, progress=False)
    assert not a.from_cache
    b = second_moment(model, LAYER, CORPUS, n_tokens=300, cache_dir=tmp_path, progress=False)
    assert b.from_cache and torch.equal(a.C, b.C)
    assert not second_moment(model, LAYER, CORPUS[1:], n_tokens=300, cache_dir=tmp_path, progress=False).from_cache
    assert not second_moment(model, 0, CORPUS, n_tokens=300, cache_dir=tmp_path, progress=False).from_cache
    with torch.no_grad():
        model.blocks[2].mlp.W_out[0, 0] += 1e-3  # even a weight above the layer changes the fingerprint
    c = second_moment(model, LAYER, CORPUS, n_tokens=300, cache_dir=tmp_path, progress=False)
    assert not c.from_cache and c.model_fingerprint != a.model_fingerprint


def test_env_cache_dir_and_corrupt_cache_detected(tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path))
    a = second_moment(tiny_gpt2, LAYER, CORPUS, n_tokens=200, progress=False)
    assert a.path.startswith(str(tmp_path))
    raw = bytearray(open(a.path, "rb").read())
    raw[-20] ^= 0xFF  # flip bits inside C
    open(a.path, "wb").write(bytes(raw))
    with pytest.raises(CacheError, match="(?i)corrupt|checksum"):
        second_moment(tiny_gpt2, LAYER, CORPUS, n_tokens=200, progress=False)
    open(a.path, "wb").write(b"not a safetensors file")
    with pytest.raises(CacheError):
        second_moment(tiny_gpt2, LAYER, CORPUS, n_tokens=200, progress=False)
    fresh = second_moment(tiny_gpt2, LAYER, CORPUS, n_tokens=200, recompute=True, progress=False)
    torch.testing.assert_close(fresh.C, a.C)


# --- the update -----------------------------------------------------------------------------

def test_update_maps_k_star_to_v_star_and_spares_orthogonal_keys(tiny_model, stats_for, edit_for):
    sm, e = stats_for(tiny_model), edit_for(tiny_model)
    mlp = tiny_model.blocks[LAYER].mlp
    W0 = mlp.W_out.detach().double().clone()
    # a bridge's bias-free MLP has no b_out (a HookedTransformer holds zeros)
    b = mlp.b_out.detach().double() if mlp.b_out is not None else torch.zeros(W0.shape[1], dtype=torch.float64)
    # u is C⁻¹k* (normalised), with the exact C
    Cinv_k = torch.linalg.solve(sm.C, e.k_star)
    torch.testing.assert_close(e.u, Cinv_k / Cinv_k.norm(), rtol=1e-8, atol=1e-10)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(5, W0.shape[0], generator=g, dtype=torch.float64)
    k_orth = k - (k @ e.u)[:, None] * e.u[None]  # kᵀ(C⁻¹k*) = 0
    with edited(tiny_model, e):
        W1 = mlp.W_out.detach().double()
        torch.testing.assert_close(e.k_star @ W1 + b, e.v_star, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k_orth @ W1, k_orth @ W0, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(e.k_star @ W1, e.k_star @ W0)
    assert e.loss_trace.shape[1] == 5 and 1 <= e.loss_trace.shape[0] <= FAST.v_num_grad_steps


def test_reinsert_rebuilds_the_same_update_and_scales_or_drops_the_statistics(tiny_model, stats_for, edit_for):
    sm, e = stats_for(tiny_model), edit_for(tiny_model)
    same = reinsert(tiny_model, e, sm)
    torch.testing.assert_close(same.u, e.u.double(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(same.lam, e.lam.double(), rtol=1e-7, atol=1e-9)
    mlp = tiny_model.blocks[LAYER].mlp
    W0 = mlp.W_out.detach().double().clone()
    # a bridge's bias-free MLP has no b_out (a HookedTransformer holds zeros)
    b = mlp.b_out.detach().double() if mlp.b_out is not None else torch.zeros(W0.shape[1], dtype=torch.float64)
    v_old = e.k_star.double() @ W0 + b
    # half strength: k* maps halfway to v*; identity statistics: u is k* itself
    for edit, expect_u in ((reinsert(tiny_model, e, sm, strength=0.5), same.u),
                           (reinsert(tiny_model, e, None, strength=0.5), e.k_star.double() / e.k_star.norm())):
        torch.testing.assert_close(edit.u, expect_u, rtol=1e-9, atol=1e-12)
        with edited(tiny_model, edit):
            got = e.k_star.double() @ mlp.W_out.detach().double() + b
        torch.testing.assert_close(got, v_old + 0.5 * (e.v_star.double() - v_old), rtol=1e-5, atol=1e-5)
    assert reinsert(tiny_model, e, None).hparams.mom2_adjustment is False
    assert torch.equal(mlp.W_out.detach().double(), W0)
    with pytest.raises(InvalidArgumentError, match="strength"):
        reinsert(tiny_model, e, sm, strength=0.0)
    with pytest.raises(InvalidArgumentError, match="update_key"):
        reinsert(tiny_model, dataclasses.replace(e, hparams=dataclasses.replace(e.hparams, update_key="prompt")), sm)
    with pytest.raises(InvalidArgumentError, match="layer"):
        reinsert(tiny_model, dataclasses.replace(e, layer=LAYER + 1), sm)


def test_edit_raises_new_target_probability(tiny_gpt2, stats_for):
    """Even on a random model the optimised value makes the new target more likely."""
    hp = dataclasses.replace(FAST, v_num_grad_steps=12, v_weight_decay=0.0)
    e = compute_rome_edit(tiny_gpt2, REQUEST, layer=LAYER, stats=stats_for(tiny_gpt2), hparams=hp)
    assert e.loss_trace[-1, 1] < e.loss_trace[0, 1]  # the NLL fell
    assert e.loss_trace[-1, 4] > e.loss_trace[0, 4]


def test_edit_is_deterministic_and_leaves_model_unchanged(tiny_gated, stats_for, edit_for):
    fp = model_fingerprint(tiny_gated)
    e1 = edit_for(tiny_gated)
    e2 = compute_rome_edit(tiny_gated, REQUEST, layer=LAYER, stats=stats_for(tiny_gated), hparams=FAST)
    assert model_fingerprint(tiny_gated) == fp == e1.model_fingerprint
    assert torch.equal(e1.u, e2.u) and torch.equal(e1.lam, e2.lam)
    assert context_prefixes(tiny_gated, FAST) == context_prefixes(tiny_gated, FAST)
    assert context_prefixes(tiny_gated, FAST)[0] == "" and len(context_prefixes(tiny_gated, FAST)) == 3


def test_edited_restores_bit_exactly_also_on_exception(tiny_gpt2, edit_for):
    e = edit_for(tiny_gpt2)
    before = {n: p.detach().clone() for n, p in tiny_gpt2.named_parameters()}
    W0 = tiny_gpt2.blocks[LAYER].mlp.W_out.detach().clone()
    with edited(tiny_gpt2, e):
        assert not torch.equal(tiny_gpt2.blocks[LAYER].mlp.W_out, W0)
    assert all(torch.equal(p, before[n]) for n, p in tiny_gpt2.named_parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with edited(tiny_gpt2, e):
            raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in tiny_gpt2.named_parameters())
    assert getattr(tiny_gpt2, "_kvmem_edit_stack") == []


def test_stacked_edits_and_apply_edit(tiny_gpt2, stats_for, edit_for):
    model = build_tiny("gpt2")  # a fresh model with the same weights
    e1 = edit_for(tiny_gpt2)  # same weights as the copy, so the fingerprint matches
    req2 = Fact("Lionel Messi plays the sport of", "Lionel Messi", target_true="soccer", target_new="tennis")
    e2 = compute_rome_edit(model, req2, layer=LAYER, stats=stats_for(tiny_gpt2), hparams=FAST)
    W0 = model.blocks[LAYER].mlp.W_out.detach().clone()
    with edited(model, e1, e2):
        expect = W0 + (e1.delta(torch.float64) + e2.delta(torch.float64)).float()
        torch.testing.assert_close(model.blocks[LAYER].mlp.W_out, expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.blocks[LAYER].mlp.W_out, W0)
    apply_edit(model, e1)  # mutates
    apply_edit(model, e2)  # computed on the unedited model: accepted through kvmem's edit stack
    assert not torch.equal(model.blocks[LAYER].mlp.W_out, W0)


def test_save_load_roundtrip_and_foreign_or_corrupt_files(tiny_gpt2, tiny_gated, edit_for, tmp_path):
    e = edit_for(tiny_gpt2)
    path = e.save(tmp_path / "edit.safetensors")
    back = Edit.load(path)
    for name in ("u", "lam", "k_star", "v_star", "loss_trace"):
        assert torch.equal(getattr(back, name), getattr(e, name))
    assert back.request == e.request and back.hparams == e.hparams and back.layer == e.layer
    with edited(tiny_gpt2, back):
        pass
    # another model (same shapes, other weights): rejected, weights untouched
    W = tiny_gated.blocks[LAYER].mlp.W_out.detach().clone()
    with pytest.raises(ModelMismatchError, match="other weights"):
        apply_edit(tiny_gated, back)
    with pytest.raises(ModelMismatchError):
        with edited(tiny_gated, back):
            pass
    assert torch.equal(tiny_gated.blocks[LAYER].mlp.W_out, W)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x55
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CacheError):
        Edit.load(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(CacheError):
        Edit.load(tmp_path / "junk.safetensors")


# --- bad input --------------------------------------------------------------------------------

def test_bad_requests_raise_and_leave_model_unchanged(tiny_gpt2, stats_for):
    sm = stats_for(tiny_gpt2)
    fp = model_fingerprint(tiny_gpt2)

    def edit(req, **kw):
        kw.setdefault("stats", sm)
        kw.setdefault("layer", LAYER)
        return compute_rome_edit(tiny_gpt2, req, hparams=FAST, **kw)

    with pytest.raises(EmptyTargetError, match="target_new"):
        edit(Fact(REQUEST.prompt, REQUEST.subject, target_true="Paris"))
    with pytest.raises(InvalidArgumentError, match="nothing to edit"):
        edit(Fact(REQUEST.prompt, REQUEST.subject, target_true="Paris", target_new="Paris"))
    with pytest.raises(SubjectNotFoundError):
        Fact(REQUEST.prompt, "Big Ben", target_new="Rome")
    sneaky = Fact(REQUEST.prompt, REQUEST.subject, target_new="Rome")
    object.__setattr__(sneaky, "subject", "Big Ben")  # bypasses Fact's own check
    with pytest.raises(SubjectNotFoundError):
        edit(sneaky)
    with pytest.raises(LayerOutOfRangeError):
        edit(REQUEST, layer=7)
    with pytest.raises(InvalidArgumentError, match="stats"):
        edit(REQUEST, stats=None)
    with pytest.raises(InvalidArgumentError, match="layer 0"):
        edit(REQUEST, layer=0)  # stats are for layer 1
    with pytest.raises(SingularStatisticsError):
        edit(REQUEST, stats=torch.zeros(64, 64, dtype=torch.float64))
    rank1 = torch.ones(64, 1, dtype=torch.float64) @ torch.ones(1, 64, dtype=torch.float64)
    with pytest.raises(SingularStatisticsError):
        edit(REQUEST, stats=rank1)
    # a C found invertible once is not re-checked, unless it changed in place since
    from kvmem.editing.stats import check_invertible

    C = torch.eye(64, dtype=torch.float64)
    check_invertible(C)
    check_invertible(C)
    C[0, 0] = 0.0
    with pytest.raises(SingularStatisticsError):
        check_invertible(C)
    with torch.inference_mode():
        C_inf = torch.eye(64, dtype=torch.float64)
    check_invertible(C_inf)  # no version counter: checked each time, not memoised
    with pytest.raises(SingularStatisticsError, match="tokens"):
        few = second_moment(tiny_gpt2, LAYER, CORPUS, n_tokens=20, use_cache=False, progress=False)
        edit(REQUEST, stats=few)
    with pytest.raises(InvalidArgumentError):
        edit(REQUEST, stats=torch.eye(10, dtype=torch.float64))
    with pytest.raises((InvalidArgumentError, TypeError)):  # beartype rejects it first in the tests
        edit("The Eiffel Tower is in Paris")
    other = build_tiny("gpt2")  # a fresh model with the same weights
    with torch.no_grad():
        other.blocks[0].mlp.W_in[0, 0] += 1.0
    with pytest.raises(ModelMismatchError):
        compute_rome_edit(other, REQUEST, layer=LAYER, stats=sm, hparams=FAST)
    assert model_fingerprint(tiny_gpt2) == fp


def test_target_equal_to_current_answer_is_rejected(factworld, world):
    # a trained model, so its greedy answer is a word (a random model's need not be)
    wf = world.facts()[0]
    prompt = wf.prompt
    logits = factworld(torch.tensor([encode(factworld, prompt)]))[0, -1]
    answer = factworld.tokenizer.decode([int(logits.argmax())])
    assert answer == wf.target, (answer, wf.target)
    req = Fact(prompt, wf.subject, target_new=answer.strip())
    hp = dataclasses.replace(FAST, mom2_adjustment=False)
    with pytest.raises(InvalidArgumentError, match="already answers"):
        compute_rome_edit(factworld, req, layer=0, hparams=hp)


def test_all_rejections_are_kvmem_errors():
    for cls in (ModelMismatchError, SingularStatisticsError):
        assert issubclass(cls, KvmemError)
