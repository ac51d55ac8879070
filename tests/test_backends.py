"""kvmem.core.backend and kvmem.core.bridge: the operations that differ between TransformerLens 3.9's
HookedTransformer and TransformerLens 4's TransformerBridge, checked on the installed one against plain
forward passes; bad models refused; edits carried across backends by their weights fingerprint.
(The same analyses giving the same numbers on both backends: tests/test_golden.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kvmem
from kvmem.core.backend import backend_of, continue_from, decoding, installed_backend, run_to_layer
from kvmem.core.hooks import capture
from kvmem.core.tokenize import encode
from kvmem.editing import apply_edit, edited
from kvmem.core.fingerprint import weights_fingerprint
from kvmem.errors import InvalidArgumentError, ModelMismatchError

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(params=["gpt2", "gated", "postnorm"])
def any_tiny(request, tiny_gpt2, tiny_gated, tiny_postnorm):
    return {"gpt2": tiny_gpt2, "gated": tiny_gated, "postnorm": tiny_postnorm}[request.param]


def _tokens(model, text=PROMPT):
    return torch.tensor([encode(model, text)])


def test_backend_is_the_installed_one(any_tiny, factworld):
    assert backend_of(any_tiny) == backend_of(factworld) == installed_backend()


def test_other_objects_are_refused_with_what_to_do():
    with pytest.raises(InvalidArgumentError, match="load one with kvmem.load_model"):
        backend_of(torch.nn.Linear(2, 2))
    with pytest.raises(InvalidArgumentError, match="HookedTransformer"):
        kvmem.causal_trace(torch.nn.Linear(2, 2), kvmem.Fact(PROMPT, "The Eiffel Tower", target_true="Paris"))


@pytest.mark.skipif(installed_backend() != "bridge", reason="a TransformerBridge exists only on TransformerLens 4")
def test_raw_mode_and_unchecked_architectures_are_refused(tiny_gpt2, monkeypatch):
    import kvmem.core.backend as backend

    monkeypatch.setattr(tiny_gpt2, "compatibility_mode", False, raising=False)
    with pytest.raises(InvalidArgumentError, match="enable_compatibility_mode"):
        backend_of(tiny_gpt2)
    monkeypatch.undo()
    monkeypatch.setattr(backend, "CHECKED_ARCHITECTURES", {"LlamaForCausalLM"})
    with pytest.raises(InvalidArgumentError, match="has not checked .*GPT2LMHeadModel"):
        backend_of(tiny_gpt2)


def test_run_to_layer_is_the_residual_stream(any_tiny):
    model, tokens, n = any_tiny, _tokens(any_tiny), any_tiny.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    kept: dict = {}
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, capture(kept, name)) for name in names])
        for layer in range(n + 1):
            torch.testing.assert_close(run_to_layer(model, tokens, layer), kept[names[layer]])
        # the final residual, through the final norm and unembedding, is the model's own logits
        from kvmem.core.readout import final_logits

        final = run_to_layer(model, tokens, n)
        torch.testing.assert_close(final_logits(model, final[0]), logits[0], atol=1e-4, rtol=1e-4)


def test_continue_from_a_layer_equals_the_whole_pass(any_tiny):
    model, tokens, n = any_tiny, _tokens(any_tiny), any_tiny.cfg.n_layers
    with torch.no_grad():
        full = run_to_layer(model, tokens, n)
        for layer in range(n):
            resid = run_to_layer(model, tokens, layer)
            torch.testing.assert_close(continue_from(model, resid, layer), full, atol=1e-5, rtol=1e-5)


def test_continue_from_passes_gradients_to_the_residual(tiny_gpt2):
    model = tiny_gpt2
    resid = run_to_layer(model, _tokens(model), 1).detach().requires_grad_(True)
    continue_from(model, resid, 1).square().sum().backward()
    assert resid.grad is not None and resid.grad.abs().sum() > 0


def test_decoding_step_by_step_equals_whole_prompts(any_tiny):
    model = any_tiny
    tokens = _tokens(model).expand(2, -1)
    n = model.cfg.n_layers
    with torch.no_grad(), decoding(model, 2) as step:
        first = step(tokens[:, :5])
        second = step(tokens[:, 5:7])
        whole = run_to_layer(model, tokens[:, :7], n)
    torch.testing.assert_close(first, whole[:, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, whole[:, 5:7], atol=1e-5, rtol=1e-5)


# --- edits across backends: the weights fingerprint ------------------------------------------------

def _edit(factworld, world):
    from kvmem.editing import RomeHparams
    from kvmem.factworld import counterfact_records

    request = counterfact_records(world, n=1)[0].request
    hp = RomeHparams(layer=0, mom2_adjustment=False, v_num_grad_steps=3)
    return kvmem.compute_rome_edit(factworld, request, hparams=hp)


def test_an_edit_records_the_backend_independent_fingerprint(factworld, world, tmp_path):
    e = _edit(factworld, world)
    assert e.backend == installed_backend() and e.weights_fingerprint == weights_fingerprint(factworld)
    back = type(e).load(e.save(tmp_path / "e.safetensors"))
    assert (back.weights_fingerprint, back.backend) == (e.weights_fingerprint, e.backend)


def test_an_edit_from_the_other_backend_applies_by_its_weights_fingerprint(factworld, world):
    e = _edit(factworld, world)
    other = {"hooked": "bridge", "bridge": "hooked"}[installed_backend()]
    # as saved by the other TransformerLens: its own model fingerprint, the same weights fingerprint
    foreign = dataclasses.replace(e, model_fingerprint="0" * 64, backend=other)
    W0 = factworld.blocks[0].mlp.W_out.detach().clone()
    with edited(factworld, foreign):
        assert not torch.equal(factworld.blocks[0].mlp.W_out, W0)
    assert torch.equal(factworld.blocks[0].mlp.W_out, W0)
    # other weights: refused with the reason
    wrong = dataclasses.replace(foreign, weights_fingerprint="1" * 64)
    with pytest.raises(ModelMismatchError, match="weights differ"):
        apply_edit(factworld, wrong)
    assert torch.equal(factworld.blocks[0].mlp.W_out, W0)
