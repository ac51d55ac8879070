"""kvmem.core.hooks: each factory is a plain TransformerLens hook usable in run_with_hooks."""

from __future__ import annotations

import pytest
import torch

from kvmem.errors import InvalidArgumentError, KvmemError
from kvmem.core.hooks import add_noise, capture, freeze, gaussian_noise, restore, restore_at, scale_neurons


pytestmark = pytest.mark.usefixtures("one_thread")


TOKENS = torch.tensor([[50256, 464, 412, 733, 417, 8765, 318, 287]])


def test_add_noise_is_seeded_and_local():
    act = torch.zeros(3, 6, 16)
    a = add_noise([2, 3], scale=0.5, seed=7)(act, None)
    b = add_noise([2, 3], scale=0.5, seed=7)(act, None)
    c = add_noise([2, 3], scale=0.5, seed=8)(act, None)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.count_nonzero(a[:, [0, 1, 4, 5]]) == 0
    assert torch.all(a[:, 2:4] != 0)
    assert torch.count_nonzero(act) == 0  # input untouched
    assert torch.equal(a[:, 2:4], gaussian_noise(3, 2, 16, 0.5, seed=7))
    # each row is its own sample; rows restrict which rows are corrupted
    assert not torch.equal(a[0], a[1])
    r = add_noise([2], scale=1.0, seed=0, rows=[1])(act, None)
    assert torch.count_nonzero(r[0]) == 0 and torch.count_nonzero(r[2]) == 0 and torch.count_nonzero(r[1]) > 0


def test_noise_scale():
    big = gaussian_noise(4, 50, 100, scale=3.0, seed=0)
    assert abs(float(big.std()) - 3.0) < 0.1


def test_add_noise_in_run_with_hooks_changes_only_later_positions(tiny_model):
    clean = tiny_model(TOKENS)
    noisy = tiny_model.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", add_noise([3], 1.0, seed=0))])
    torch.testing.assert_close(noisy[:, :3], clean[:, :3])
    assert not torch.allclose(noisy[:, 3:], clean[:, 3:])


def test_restore_brings_back_clean_run(tiny_model):
    _, clean_cache = tiny_model.run_with_cache(TOKENS)
    name = "blocks.1.hook_resid_post"
    hooks = [("hook_embed", add_noise([2, 3], 2.0)), (name, restore(clean_cache[name]))]
    restored = tiny_model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    torch.testing.assert_close(restored, tiny_model(TOKENS), atol=1e-5, rtol=1e-5)


def test_restore_positions_and_rows():
    act = torch.zeros(2, 4, 3)
    clean = torch.arange(12.0).reshape(4, 3)
    out = restore(clean, positions=[1, 3], rows=[1])(act, None)
    assert torch.equal(out[1, 1], clean[1]) and torch.equal(out[1, 3], clean[3])
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[1, [0, 2]]) == 0
    per_row = torch.randn(2, 4, 3)
    out2 = restore(per_row, positions=[0])(act, None)
    assert torch.equal(out2[:, 0], per_row[:, 0])
    with pytest.raises(InvalidArgumentError):
        restore(torch.zeros(4, 5), positions=[0])(act, None)
    with pytest.raises(InvalidArgumentError):
        restore(clean, positions=[9])(act, None)


def test_freeze_holds_recorded_values(tiny_model):
    _, corrupt_cache = tiny_model.run_with_cache(TOKENS)
    name = "blocks.0.hook_mlp_out"
    frozen = tiny_model.run_with_hooks(
        TOKENS,
        fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a * 1.5), (name, freeze(corrupt_cache[name], [4]))],
    )
    seen = {}
    tiny_model.run_with_hooks(
        TOKENS,
        fwd_hooks=[
            ("blocks.0.hook_resid_pre", lambda a, hook: a * 1.5),
            (name, freeze(corrupt_cache[name], [4])),
            (name, lambda a, hook: seen.setdefault("v", a.clone())),
        ],
    )
    torch.testing.assert_close(seen["v"][0, 4], corrupt_cache[name][0, 4])
    assert frozen.shape == (1, TOKENS.shape[1], tiny_model.cfg.d_vocab)


def test_restore_at_pairs():
    act = torch.zeros(3, 5, 2)
    values = torch.ones(2, 2) * torch.tensor([[1.0], [2.0]])
    out = restore_at(values, rows=[0, 2], positions=[4, 1])(act, None)
    assert torch.equal(out[0, 4], values[0]) and torch.equal(out[2, 1], values[1])
    assert float(out.sum()) == float(values.sum())
    with pytest.raises(InvalidArgumentError):
        restore_at(values, rows=[0], positions=[4, 1])


def test_scale_neurons():
    act = torch.ones(2, 3, 8)
    out = scale_neurons([1], [2, 5], 0.0)(act, None)
    assert out[:, 1, [2, 5]].abs().sum() == 0 and out.sum() == act.sum() - 4
    amp = scale_neurons(None, [0], 2.0, rows=[1])(act, None)
    assert torch.equal(amp[1, :, 0], torch.full((3,), 2.0)) and torch.equal(amp[0], act[0])
    with pytest.raises(InvalidArgumentError):
        scale_neurons([0], [99], 0.0)(act, None)
    with pytest.raises(KvmemError):
        scale_neurons([0], [], 0.0)


def test_scale_neurons_in_model(tiny_model):
    name = "blocks.1.mlp.hook_post"
    base = tiny_model(TOKENS)
    same = tiny_model.run_with_hooks(TOKENS, fwd_hooks=[(name, scale_neurons([7], [0, 1, 2], 1.0))])
    torch.testing.assert_close(same, base)
    off = tiny_model.run_with_hooks(TOKENS, fwd_hooks=[(name, scale_neurons([7], list(range(64)), 0.0))])
    torch.testing.assert_close(off[:, :7], base[:, :7])
    assert not torch.allclose(off[:, 7], base[:, 7])


def test_capture_keeps_activations_by_name_key_and_call(tiny_model):
    names = ["blocks.0.hook_mlp_out", "blocks.2.mlp.hook_post"]
    _, cache = tiny_model.run_with_cache(TOKENS)
    kept, by_key, calls = {}, {}, {}
    hooks = [(n, capture(kept)) for n in names]  # keyed by the hook point's name
    hooks += [("blocks.1.hook_resid_pre", capture(by_key, "resid", clone=True))]
    hooks += [("blocks.1.hook_attn_out", capture(calls, append=True))]
    out = tiny_model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    tiny_model.run_with_hooks(TOKENS[:, :4], fwd_hooks=hooks[-1:])
    torch.testing.assert_close(out, tiny_model(TOKENS))  # passes activations on unchanged
    assert set(kept) == set(names) and set(by_key) == {"resid"}
    for n in names:
        assert torch.equal(kept[n], cache[n]) and not kept[n].requires_grad
    assert torch.equal(by_key["resid"], cache["blocks.1.hook_resid_pre"])
    shapes = [tuple(a.shape[:2]) for a in calls["blocks.1.hook_attn_out"]]
    assert shapes == [(1, TOKENS.shape[1]), (1, 4)]  # one entry per call


def test_capture_clone_survives_in_place_writes():
    act = torch.ones(1, 3, 4)
    shared, copied = {}, {}
    capture(shared, "a")(act, None)
    capture(copied, "a", clone=True)(act, None)
    act.mul_(2)  # a later hook or op writing the same storage
    assert float(shared["a"].sum()) == 24 and float(copied["a"].sum()) == 12
    with pytest.raises(InvalidArgumentError):
        capture({})(act, None)  # no key and no hook point to take a name from


def test_bad_hook_arguments():
    with pytest.raises(InvalidArgumentError):
        add_noise([], 1.0)
    with pytest.raises(InvalidArgumentError):
        add_noise([0], -1.0)
    with pytest.raises(InvalidArgumentError):
        add_noise([7], 1.0)(torch.zeros(1, 3, 4), None)
