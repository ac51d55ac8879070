"""`predict_interference`: the update's algebra checked against the applied edit (the layer's
output, read off the running model), the first-order readout's t = 1 counterpart against margins
measured with the edit in the weights, and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

from kvmem.core.facts import Fact
from kvmem.core.fingerprint import model_fingerprint
from kvmem.core.tokenize import encode
from kvmem.core.weights import hook_post_name
from kvmem.data import CounterFactRecord
from kvmem.editing import RomeHparams, compute_rome_edit, edited, second_moment
from kvmem.editing.interference import KeyBank, leakage, predict_interference
from kvmem.errors import (InterferenceWarning, InvalidArgumentError, LayerOutOfRangeError, ModelMismatchError,
                          UnknownFactError, UnsafeEditError)
from kvmem.evaluation import target_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

HP = RomeHparams(layer=0, prefixes=((5, 2),), v_num_grad_steps=8)


@pytest.fixture(scope="module")
def fw(_shared_factworld, tmp_path_factory):
    """factworld, one of its CounterFact records with neighbours, C of layer 0 and the edit."""
    from kvmem.factworld import corpus, counterfact_records

    model = _shared_factworld
    rec = next(r for r in counterfact_records(n_neighbours=6, seed=0) if len(r.neighborhood_prompts) >= 4)
    stats = second_moment(model, 0, corpus(), n_tokens=6000, cache_dir=tmp_path_factory.mktemp("c"), progress=False)
    edit = compute_rome_edit(model, rec.request, stats=stats, hparams=HP)
    known = [Fact(r.request.prompt, r.subject, target_true=r.request.target_true)
             for r in counterfact_records(n_neighbours=0, seed=1)[:12] if r.subject != rec.subject]
    return model, rec, stats, edit, known


def _mlp_outputs(model, layer, prompt):
    """(keys, MLP output) of `layer` at every position of `prompt`, read off a forward pass."""
    got = {}

    def keep(name):
        def hook(act, hook=None):
            got[name] = act.detach().double()[0]
        return hook

    h = model.blocks[layer].mlp.register_forward_hook(lambda mod, inp, out: got.__setitem__("out", out.detach().double()[0]))
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(hook_post_name(model, layer), keep("k"))]):
            model(torch.tensor([encode(model, prompt)]))
    finally:
        h.remove()
    return got["k"], got["out"]


def _check_layer_change(model, edit, res, prompts, tol):
    """For every position of every prompt: the change of the layer's MLP output under the applied
    edit equals λ(k)(v* − v_old), λ computed plainly from C (or u) and k*."""
    W = model.blocks[edit.layer].mlp.W_out.detach().double().cpu()
    v_old = edit.k_star.double() @ W
    b = getattr(model.blocks[edit.layer].mlp, "b_out", None)
    if b is not None:
        v_old = v_old + b.detach().double().cpu()
    change = edit.v_star.double() - v_old
    for p in prompts:
        keys, out0 = _mlp_outputs(model, edit.layer, p)
        with edited(model, edit):
            _, out1 = _mlp_outputs(model, edit.layer, p)
        lam = leakage(edit, keys)
        predicted = lam[:, None] * change
        assert torch.allclose(res.layer_change(keys), predicted, atol=tol, rtol=0)
        assert torch.allclose(out1 - out0, predicted.to(out0), atol=tol * max(1.0, float(change.norm())), rtol=0)


def test_layer_change_equals_applied_edit_factworld(fw):
    model, rec, stats, edit, known = fw
    fp = model_fingerprint(model)
    res = predict_interference(model, rec, edit=edit, banks=("neighbourhood", "known"), known_facts=known,
                               exact=True, require_known=False)
    assert model_fingerprint(model) == fp  # nothing applied
    # λ as the docstring defines it, with C⁻¹ from a plain solve
    Cinv_k = torch.linalg.solve(stats.C.double(), edit.k_star.double())
    keys, _ = _mlp_outputs(model, 0, rec.neighborhood_prompts[0])
    lam_plain = keys @ Cinv_k / (edit.k_star.double() @ Cinv_k)
    assert torch.allclose(leakage(edit, keys), lam_plain, atol=1e-8)
    assert abs(float(leakage(edit, edit.k_star[None])[0]) - 1.0) < 1e-12
    _check_layer_change(model, edit, res, [rec.request.prompt, *rec.neighborhood_prompts[:2]], tol=1e-4)
    # the exact (t = 1) readout is the margin measured with the edit in the weights
    items = [(e.prompt, t) for e in res.effects for t in (e.answer, e.competitor)]
    s0, n = target_logprobs(model, items)
    with edited(model, edit):
        s1, _ = target_logprobs(model, items)
    m0 = (s0 / n).view(-1, 2)
    m1 = (s1 / n).view(-1, 2)
    got0 = torch.tensor([e.margin for e in res.effects], dtype=torch.float64)
    got1 = torch.tensor([e.margin + e.exact for e in res.effects], dtype=torch.float64)
    assert torch.allclose(got0, m0[:, 0] - m0[:, 1], atol=2e-4)
    assert torch.allclose(got1, m1[:, 0] - m1[:, 1], atol=2e-3)
    # first order: close to the exact change for this small-λ edit (measured in the benchmark)
    pred = torch.tensor([e.predicted for e in res.effects])
    exact = torch.tensor([e.exact for e in res.effects])
    assert torch.corrcoef(torch.stack([pred, exact]))[0, 1] > 0.8
    assert res.n_known == len([e for e in res.effects if e.bank == "known"]) > 0
    assert "risk=" in repr(res) and len(res.to_frame()) == len(res.effects)
    assert set(res.keys_frame().index) == {"neighbourhood", "known"}


def test_layer_change_equals_applied_edit_tiny(tiny_model):
    model = tiny_model
    torch.manual_seed(0)
    d = int(model.cfg.d_mlp)
    A = torch.randn(4 * d, d, dtype=torch.float64)
    C = A.T @ A / (4 * d) + 0.1 * torch.eye(d, dtype=torch.float64)
    req = Fact("The Eiffel Tower is located in", "The Eiffel Tower", target_true="Paris", target_new="Rome")
    edit = compute_rome_edit(model, req, layer=1, stats=C, hparams=RomeHparams(layer=1, prefixes=((3, 1),), v_num_grad_steps=3))
    keys = torch.randn(5, d, dtype=torch.float64)
    res = predict_interference(model, req, edit=edit, banks=KeyBank("random", keys, layer=1), require_known=False)
    lam_plain = keys @ torch.linalg.solve(C, edit.k_star.double()) / (edit.k_star.double() @ torch.linalg.solve(C, edit.k_star.double()))
    assert torch.allclose(res.lam["random"], lam_plain, atol=1e-9)
    _check_layer_change(model, edit, res, ["The Eiffel Tower is located in", "Paris is a city"], tol=1e-4)


def test_bad_input(fw, tiny_gpt2):
    model, rec, stats, edit, known = fw
    d = int(model.cfg.d_mlp)
    with pytest.raises(InvalidArgumentError, match="banks is empty"):
        predict_interference(model, rec, edit=edit, banks=[], require_known=False)
    with pytest.raises(InvalidArgumentError, match="empty"):
        predict_interference(model, rec, edit=edit, banks=KeyBank("none", torch.zeros(0, d)), require_known=False)
    with pytest.raises(ModelMismatchError, match="another model"):
        predict_interference(model, rec, edit=edit, banks=torch.zeros(3, d + 1), require_known=False)
    with pytest.raises(ModelMismatchError, match="other model weights"):
        predict_interference(model, rec, edit=edit, require_known=False,
                             banks=KeyBank("other", torch.ones(2, d), model_fingerprint=model_fingerprint(tiny_gpt2)))
    with pytest.raises(LayerOutOfRangeError):
        predict_interference(model, rec, 7, stats=stats, hparams=HP, require_known=False)
    with pytest.raises(InvalidArgumentError, match="neighbourhood prompts"):
        predict_interference(model, rec.request, edit=edit, banks=("neighbourhood",), require_known=False)
    with pytest.raises(InvalidArgumentError, match="Unknown bank"):
        predict_interference(model, rec, edit=edit, banks=("nope",), require_known=False)
    unknown = Fact(rec.request.prompt, rec.subject, target_true=rec.request.target_new, target_new=rec.request.target_true)
    with pytest.raises(UnknownFactError):
        predict_interference(model, unknown, stats=stats, hparams=HP, banks=("known",), known_facts=known)
    with pytest.raises(InvalidArgumentError, match="'known' bank is empty"):
        predict_interference(model, rec, edit=edit, banks=("known",), known_facts=[], require_known=False)


def test_safe_refuses_and_warns(fw):
    """The warn / refuse plumbing: a threshold of −1 makes any prediction unsafe (risk ≥ 0), so
    `warn_or_refuse` must refuse or warn; `compute_rome_edit(safe=True)` passes an edit predicted
    safe on facts the model knows without a warning. (Whether the risk itself ranks real damage is
    the benchmark's question: docs/interference.md, Validation.)"""
    model, rec, stats, edit, known = fw
    res = predict_interference(model, rec, edit=edit, banks=("neighbourhood",), require_known=False, threshold=-1.0)
    assert res.unsafe
    from kvmem.editing.interference import warn_or_refuse

    with pytest.raises(UnsafeEditError):
        warn_or_refuse(res, safe=True)
    with pytest.warns(InterferenceWarning):
        warn_or_refuse(res, safe=False)
    # compute_rome_edit's own path: a safe edit passes without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", InterferenceWarning)
        e = compute_rome_edit(model, rec.request, stats=stats, hparams=HP, safe=True, safe_facts=known)
    assert e.layer == 0


def test_least_interference_layer_and_diagnose(fw, tmp_path):
    """The chooser edits a layer whose edit reaches the target with the lowest predicted risk;
    `diagnose` reports the interference of the edit at its peak layer."""
    import kvmem
    from kvmem.editing.interference import least_interference_edit
    from kvmem.factworld import corpus

    model, rec, stats, edit, known = fw
    memo = {0: stats}

    def stats_for(layer):
        if layer not in memo:
            memo[layer] = second_moment(model, layer, corpus(), n_tokens=6000, cache_dir=tmp_path, progress=False)
        return memo[layer]

    choice = least_interference_edit(model, rec, stats=stats_for, layers=[0, 1], hparams=HP)
    assert choice.layer in (0, 1) and choice.reaches[choice.layers.index(choice.layer)]
    ok = [r for r, reach in zip(choice.risks, choice.reaches) if reach]
    assert choice.risks[choice.layers.index(choice.layer)] == min(ok)
    assert choice.edit.layer == choice.layer and len(choice.to_frame()) == 2
    e = compute_rome_edit(model, rec.request, layer="least-interference", stats=stats_for, hparams=HP, safe_facts=known)
    assert e.layer in (0, 1)  # the first half of factworld's 4 layers
    with pytest.raises(InvalidArgumentError, match="every candidate layer"):
        compute_rome_edit(model, rec.request, layer="least-interference", stats=stats, hparams=HP)
    loc = kvmem.diagnose(model, rec.request, samples=2, steps=4, interference_stats=stats_for,
                         neighbourhood=rec.neighborhood_prompts)
    assert loc.interference is not None and loc.interference.layer == loc.peak_layer
    assert loc.summary()["interference_risk"] == loc.interference.risk
    assert "predicted interference" in str(loc.show())
