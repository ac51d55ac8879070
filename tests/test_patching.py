"""kvmem.core.engine: the batched engine equals plain one-run-per-intervention loops."""

from __future__ import annotations

import pytest
import torch

from kvmem.core.backend import run_to_layer
from transformer_lens import patching as tl_patching

from kvmem.errors import InvalidArgumentError, KvmemError, LayerOutOfRangeError
from kvmem.core.hooks import add_noise, freeze, restore, restore_at
from kvmem.core.engine import (
    Intervention,
    RowGroup,
    Site,
    forward_rows,
    patch_prompts,
    record_run,
    rows_for_budget,
    run_interventions,
)
from kvmem.core.tokenize import encode


pytestmark = pytest.mark.usefixtures("one_thread")


PROMPT = "The Eiffel Tower is located in the city of"
CORRUPT = "The Blue Green Red Tower is located in the city of"
ANSWER = 6342  # " Paris"


def log_prob(logits):
    return torch.log_softmax(logits.float(), dim=-1)[:, ANSWER]


def hook_name(site: Site) -> str:
    return f"blocks.{site.layer}.hook_{site.component}"


def naive(model, tokens, noise_positions, scale, samples, iv: Intervention):
    """One run_with_hooks per intervention: noise + one restore hook per site (+ freezes)."""
    batch = tokens[None].expand(samples, -1)
    noise = ("hook_embed", add_noise(noise_positions, scale, seed=3))
    _, clean = model.run_with_cache(tokens[None])
    corrupt = None
    names = [hook_name(s) for s in iv.freeze]
    if names:
        with model.hooks(fwd_hooks=[noise]):
            _, corrupt = model.run_with_cache(batch, names_filter=lambda n: n in names)
    hooks = [noise] + [(hook_name(s), restore(clean[hook_name(s)], [s.position])) for s in iv.restore]
    hooks += [(hook_name(s), freeze(corrupt[hook_name(s)], [s.position])) for s in iv.freeze]
    logits = model.run_with_hooks(batch, fwd_hooks=hooks)
    return log_prob(logits[:, -1])


INTERVENTIONS = [
    Intervention((Site("resid_pre", 0, 3),)),
    Intervention((Site("resid_post", 1, 4),)),
    Intervention((Site("resid_post", 2, 9),)),
    Intervention((Site("mlp_out", 1, 5), Site("mlp_out", 2, 5))),
    Intervention((Site("attn_out", 0, 4), Site("attn_out", 1, 4), Site("attn_out", 2, 4))),
    Intervention((Site("mlp_out", 0, 2), Site("attn_out", 2, 6))),  # mixed sites and positions
    Intervention((Site("resid_post", 0, 5),), freeze=tuple(Site("mlp_out", l, 5) for l in range(3))),
    Intervention((Site("resid_post", 0, 3),), freeze=tuple(Site("attn_out", l, 3) for l in range(3))),
    Intervention((Site("resid_pre", 1, 0),)),  # before the noise: provably no effect
]


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_engine_equals_naive_loop(tiny_model, reuse_prefix):
    tokens = torch.tensor(encode(tiny_model, PROMPT))
    subject = [2, 3, 4]
    corrupt = record_run(
        tiny_model, tokens, fwd_hooks=[("hook_embed", add_noise(subject, 0.5, seed=3))], n_rows=3
    )
    clean = record_run(tiny_model, tokens)
    got = run_interventions(
        tiny_model, corrupt, clean, INTERVENTIONS, log_prob, batch_size=4, reuse_prefix=reuse_prefix
    )
    for i, iv in enumerate(INTERVENTIONS):
        want = naive(tiny_model, tokens, subject, 0.5, 3, iv)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5, msg=f"intervention {iv}")


def test_chunking_does_not_change_results(tiny_gated):
    tokens = torch.tensor(encode(tiny_gated, PROMPT))
    corrupt = record_run(tiny_gated, tokens, [("hook_embed", add_noise([2, 3, 4], 1.0))], n_rows=2)
    clean = record_run(tiny_gated, tokens)
    a = run_interventions(tiny_gated, corrupt, clean, INTERVENTIONS, log_prob, batch_size=1)
    b = run_interventions(tiny_gated, corrupt, clean, INTERVENTIONS, log_prob, batch_size=1000)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "component,tl_fn",
    [
        ("resid_pre", tl_patching.get_act_patch_resid_pre),
        ("mlp_out", tl_patching.get_act_patch_mlp_out),
        ("attn_out", tl_patching.get_act_patch_attn_out),
    ],
)
def test_patch_prompts_equals_transformer_lens(tiny_model, component, tl_fn):
    clean = torch.tensor(encode(tiny_model, PROMPT))
    corrupted = torch.tensor(encode(tiny_model, CORRUPT))
    assert clean.shape == corrupted.shape
    _, clean_cache = tiny_model.run_with_cache(clean[None])
    want = tl_fn(tiny_model, corrupted[None], clean_cache, lambda logits: log_prob(logits[:, -1])[0])
    got = patch_prompts(tiny_model, clean, corrupted, log_prob, component=component)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_patch_prompts_accepts_strings(tiny_gpt2):
    a = patch_prompts(tiny_gpt2, PROMPT, CORRUPT, log_prob, component="resid_pre")
    assert a.shape == (3, len(encode(tiny_gpt2, PROMPT)))
    # the prompts share their first two tokens: patching there changes nothing
    corrupt = record_run(tiny_gpt2, torch.tensor(encode(tiny_gpt2, CORRUPT)))
    base = log_prob(corrupt.final_logits(tiny_gpt2))[0]
    torch.testing.assert_close(a[:, :2], base.expand(3, 2))
    assert not torch.allclose(a[0, 2:5], base.expand(3))


def test_final_residual_restored_gives_source(tiny_model):
    tokens = torch.tensor(encode(tiny_model, PROMPT))
    corrupt = record_run(tiny_model, tokens, [("hook_embed", add_noise([2, 3], 3.0))], n_rows=3)
    clean = record_run(tiny_model, tokens)
    n = tiny_model.cfg.n_layers
    iv = [Intervention((Site("resid_post", n - 1, len(tokens) - 1),))]
    got = run_interventions(tiny_model, corrupt, clean, iv, log_prob)
    want = log_prob(clean.final_logits(tiny_model))
    torch.testing.assert_close(got[0], want.expand(3), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# forward_rows: the primitive under tracing and integrated gradients


def test_forward_rows_equals_full_forward(tiny_model):
    """Row groups entering mid-network (layers 1 and 2) at position 4 of a 3-sample noisy run, with
    a hook acting on one group: the same final residual as full-length `run_with_hooks` runs that
    make the same change, for every row, and the same gradient through the hook (as IG uses it)."""
    model, n = tiny_model, tiny_model.cfg.n_layers
    tokens = torch.tensor(encode(model, PROMPT))
    noise = ("hook_embed", add_noise([2, 3], 0.7, seed=5))
    run = record_run(model, tokens, fwd_hooks=[noise], n_rows=3)
    t0 = 4
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(2, model.cfg.d_model, generator=gen)
    # group A: samples 2 and 0 enter layer 1 with their residual at t0 shifted by delta
    resid_a = run.resid[1][[2, 0], t0:].clone()
    resid_a[:, 0] += delta
    # group B: samples 1, 1, 2 enter layer 2 unchanged; its MLP neurons 3 and 5 at t0 are set to h
    h = torch.randn(3, 2, generator=gen).requires_grad_(True)
    groups = [RowGroup(1, resid_a, (2, 0)), RowGroup(2, run.resid[2][[1, 1, 2], t0:], (1, 1, 2))]

    def set_neurons(rows, pos):
        def hook(act, hook=None):
            out = act.clone()
            out[rows, pos, 3], out[rows, pos, 5] = h[:, 0], h[:, 1]
            return out

        return hook

    got = forward_rows(model, run, groups, t0, [("blocks.2.mlp.hook_post", set_neurons([2, 3, 4], 0))])
    assert got.shape == (5, len(tokens) - t0, model.cfg.d_model)
    (grad_got,) = torch.autograd.grad(got.square().sum(), h)

    # the reference: whole prompts from the start, each row set to its noise sample's embedding
    def full(samples, hooks):
        start = ("blocks.0.hook_resid_pre", restore(run.resid[0][samples]))
        with model.hooks(fwd_hooks=[start, *hooks]):
            return run_to_layer(model, tokens[None].expand(len(samples), -1), n)

    shift = restore_at(resid_a[:, 0], [0, 1], [t0, t0])
    want_a = full([2, 0], [("blocks.1.hook_resid_pre", shift)])
    want_b = full([1, 1, 2], [("blocks.2.mlp.hook_post", set_neurons([0, 1, 2], t0))])
    torch.testing.assert_close(got[:2], want_a[:, t0:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2:], want_b[:, t0:], atol=1e-5, rtol=1e-5)
    # positions before t0 do not depend on h, so the suffix carries all of its gradient
    (grad_want,) = torch.autograd.grad(want_b[:, t0:].square().sum(), h)
    torch.testing.assert_close(grad_got, grad_want, atol=1e-4, rtol=1e-4)


def test_forward_rows_bad_input(tiny_gpt2):
    run = record_run(tiny_gpt2, torch.tensor(encode(tiny_gpt2, PROMPT)))
    rows = run.resid[1][:, 2:]
    with pytest.raises(InvalidArgumentError):
        forward_rows(tiny_gpt2, run, [], 2)
    with pytest.raises(InvalidArgumentError):  # not sorted by layer
        forward_rows(tiny_gpt2, run, [RowGroup(2, run.resid[2][:, 2:], (0,)), RowGroup(1, rows, (0,))], 2)
    with pytest.raises(InvalidArgumentError):
        forward_rows(tiny_gpt2, run, [RowGroup(1, rows, (0,))], run.n_pos)
    with pytest.raises(InvalidArgumentError):
        RowGroup(1, rows, (0, 0))
    with pytest.raises(InvalidArgumentError):  # the recorded run has one row
        forward_rows(tiny_gpt2, run, [RowGroup(1, rows, (1,))], 2)
    # a larger budget never fits fewer rows; a backward pass costs more per row than a forward one
    assert rows_for_budget(tiny_gpt2, 8, 1 << 20) <= rows_for_budget(tiny_gpt2, 8, 1 << 24)
    assert rows_for_budget(tiny_gpt2, 8, 1 << 24, with_grad=True) < rows_for_budget(tiny_gpt2, 8, 1 << 24)


def test_engine_bad_input(tiny_gpt2):
    tokens = torch.tensor(encode(tiny_gpt2, PROMPT))
    run = record_run(tiny_gpt2, tokens)
    other = record_run(tiny_gpt2, tokens[:-1])
    with pytest.raises(InvalidArgumentError):
        run_interventions(tiny_gpt2, run, other, [Intervention((Site("mlp_out", 0, 1),))], log_prob)
    with pytest.raises(LayerOutOfRangeError):
        run_interventions(tiny_gpt2, run, run, [Intervention((Site("mlp_out", 3, 1),))], log_prob)
    with pytest.raises(InvalidArgumentError):
        run_interventions(tiny_gpt2, run, run, [Intervention((Site("mlp_out", 0, 99),))], log_prob)
    with pytest.raises(InvalidArgumentError):
        run_interventions(tiny_gpt2, run, run, [Intervention(())], log_prob)
    with pytest.raises(InvalidArgumentError):
        Site("mlp_in", 0, 0)
    with pytest.raises(KvmemError):
        patch_prompts(tiny_gpt2, PROMPT, "A much shorter prompt", log_prob)
    with pytest.raises(KvmemError):
        patch_prompts(tiny_gpt2, PROMPT, CORRUPT, log_prob, component="mlp_in")
