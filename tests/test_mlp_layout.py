"""Gated MLPs with pretransposed weights: bit-identical to TransformerLens's forward, same hooks,
restored afterwards, and never stale after a weight changes."""

from __future__ import annotations

import contextlib

import pytest
import torch

import kvmem.editing.generate as generate
from kvmem.editing.generate import sample_tokens
from kvmem.core.mlp_layout import pretransposed_mlps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fast_path_runs_without_transformer_lens_forward(tiny_gated, monkeypatch):
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    calls = []
    real = GatedMLP.forward
    monkeypatch.setattr(GatedMLP, "forward", lambda self, x: calls.append(1) or real(self, x))
    x = torch.randn(1, 4, tiny_gated.cfg.d_model)
    with torch.no_grad():
        want = tiny_gated.blocks[0].mlp(x)
        assert len(calls) == 1
        with pretransposed_mlps(tiny_gated):
            got = tiny_gated.blocks[0].mlp(x)
            tiny_gated(torch.tensor([[1, 2, 3]]))
        assert len(calls) == 1  # TransformerLens's forward (and its weight copies) never ran inside
    assert torch.equal(got, want)


def test_identical_outputs_and_hooks(tiny_gated):
    x = torch.randn(2, 5, tiny_gated.cfg.d_model)
    mlp = tiny_gated.blocks[1].mlp
    seen = []

    def record(act, hook):
        seen.append((hook.name, act.clone()))
        return act

    names = [f"blocks.1.mlp.{h}" for h in ("hook_pre", "hook_pre_linear", "hook_post")]
    with torch.no_grad():
        with tiny_gated.hooks(fwd_hooks=[(n, record) for n in names]):
            want = mlp(x)
            with pretransposed_mlps(tiny_gated) as n:
                assert n == tiny_gated.cfg.n_layers
                got = mlp(x)
    assert torch.equal(got, want)
    assert [s[0] for s in seen] == names * 2
    for (_, a), (_, b) in zip(seen[:3], seen[3:]):
        assert torch.equal(a, b)
    assert all("forward" not in vars(b.mlp) for b in tiny_gated.blocks)


def test_restored_on_exception_and_gpt2_untouched(tiny_gated, tiny_gpt2):
    with pytest.raises(RuntimeError, match="boom"):
        with pretransposed_mlps(tiny_gated):
            raise RuntimeError("boom")
    assert all("forward" not in vars(b.mlp) for b in tiny_gated.blocks)
    with pretransposed_mlps(tiny_gpt2) as n:
        assert n == 0


def test_falls_back_after_in_place_change_and_with_gradients(tiny_gated):
    x = torch.randn(1, 3, tiny_gated.cfg.d_model)
    mlp = tiny_gated.blocks[0].mlp
    original = mlp.W_out.detach().clone()
    had_grad = mlp.W_out.requires_grad
    mlp.W_out.requires_grad_(True)  # with gradients on, W_out must take part (not a constant copy)
    try:
        with pretransposed_mlps(tiny_gated):
            with torch.no_grad():
                before = mlp(x)
                mlp.W_out.mul_(2.0)
                after = mlp(x)
            with torch.enable_grad():
                y = mlp(x)
        (g,) = torch.autograd.grad(y.sum(), mlp.W_out)
    finally:
        mlp.W_out.requires_grad_(had_grad)
        with torch.no_grad():
            mlp.W_out.copy_(original)
    assert g.abs().sum() > 0
    assert not torch.allclose(before, after)  # the new weights, not the stale copy
    with torch.no_grad():
        mlp.W_out.mul_(2.0)
        ref = mlp(x)
        mlp.W_out.copy_(original)
    assert torch.equal(after, ref)


def test_generation_unchanged(tiny_gated, monkeypatch):
    prompt = torch.tensor([1, 5, 9, 13])
    fast = sample_tokens(tiny_gated, prompt, 3, 12, 5, torch.Generator().manual_seed(1))
    monkeypatch.setattr(generate, "pretransposed_mlps", lambda model: contextlib.nullcontext(0))
    plain = sample_tokens(tiny_gated, prompt, 3, 12, 5, torch.Generator().manual_seed(1))
    assert torch.equal(fast, plain)
