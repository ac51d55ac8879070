"""ROME's v*: the value an MLP must write at the subject's last token for the model to say the
new object, found by gradient descent on a vector δ added to the MLP's output there (Meng et al.,
2022, Eq. 4). Shared by ROME (`compute_rome_edit`, one layer) and MEMIT (`compute_memit_edit`,
v* at the last of its layers).

    fit = fit_value(model, request, layer, hparams, prefixes)
    fit.k_star      # the layer's key at the subject's last token, averaged over the contexts
    fit.delta       # δ: the change of the MLP output that makes the model answer target_new
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem.core.backend import continue_from, run_to_layer
from kvmem.core.facts import Fact, occurrences, tokenize_fact
from kvmem.core.hooks import add_mlp_output_hook, capture
from kvmem.core.readout import final_logits
from kvmem.core.tokenize import pad_batch, spec_for
from kvmem.core.weights import hook_post_name, mlp_weights
from kvmem.errors import AlreadySatisfiedError, InvalidArgumentError


@dataclass(frozen=True)
class ValueFit:
    """The outcome of v*'s optimisation at one layer for one request (all float64 but `trace`).

    `ctx_keys[i]`: the key at the subject's last token in context i (`prefixes[i]` + prompt);
    `k_star` their mean; `v_init` = k_starᵀW_out + b_out; `delta` the optimised δ (v* = v_init + δ);
    `trace` columns: loss, nll, kl, weight_decay, p_target, one row per step."""

    layer: int
    ctx_keys: Float[Tensor, "ctx d_mlp"]
    k_star: Float[Tensor, "d_mlp"]
    v_init: Float[Tensor, "d_model"]
    delta: Float[Tensor, "d_model"]
    b_out: Float[Tensor, "d_model"]
    trace: Float[Tensor, "step 5"]


def _subject_occurrence(text: str, subject: str, offset: int) -> int:
    starts = occurrences(text, subject)
    for i, s in enumerate(starts):
        if s >= offset:
            return i
    raise InvalidArgumentError(f"Subject {subject!r} not found after the prefix in {text!r}.")


def fit_value(model, request: Fact, layer: int, hparams, prefixes: Sequence[str], *,
              target_new: str | None = None, verbose: bool = False) -> ValueFit:
    """Optimise δ at `layer`'s MLP output (see the module docstring) with `hparams`' settings
    (a `RomeHparams` or anything with its v_* / kl_* / clamp fields). Raises
    `InvalidArgumentError` when the model already answers target_new on the plain prompt."""
    spec = spec_for(model)
    subject = request.subject
    target_new = request.target("new") if target_new is None else target_new
    if not prefixes:
        raise InvalidArgumentError("prefixes must hold at least one context ('' for the plain prompt).")

    # rows: one per context (prompt + new target, teacher-forced), then the KL prompt
    rows, lookup, nll_reads = [], [], []
    for p in prefixes:
        text = p + request.prompt
        tf = tokenize_fact(spec, Fact(text, subject, target_new=target_new), "new",
                           occurrence=_subject_occurrence(text, subject, len(p)))
        tokens, positions = tf.teacher_forced()
        r = len(rows)
        rows.append(tokens)
        lookup.append((r, tf.subject.last))
        nll_reads.extend((r, pos, tid) for pos, tid in zip(positions, tf.target_ids))
    kl_fact = Fact.from_template(hparams.kl_prompt, subject)
    kl_tf = tokenize_fact(spec, kl_fact, None, occurrence=-1)
    kl_row = len(rows)
    rows.append(kl_tf.tokens)
    lookup.append((kl_row, kl_tf.subject.last))
    kl_pos = kl_tf.subject.last if hparams.kl_position == "subject_last" else kl_tf.last_pos
    n_ctx = len(prefixes)

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = pad_batch(rows, spec.pad_id)
    tokens = batch.tokens.to(device)
    mask = torch.zeros(tokens.shape[0], tokens.shape[1], 1, dtype=dtype, device=device)
    for r, pos in lookup:
        mask[r, pos] = 1.0

    # layers below the edit never change: run them once
    got: dict[str, Tensor] = {}
    resid_name = f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad():
        with model.hooks(fwd_hooks=[(resid_name, capture(got, resid_name)), (hook_post_name(model, layer), capture(got, hook_post_name(model, layer)))]):
            run_to_layer(model, tokens, layer + 1)
    resid_pre = got[resid_name]
    keys = got[hook_post_name(model, layer)]
    ctx_keys = torch.stack([keys[r, pos] for r, pos in lookup[:n_ctx]]).double()
    k_star = ctx_keys.mean(0)
    if not torch.isfinite(k_star).all() or k_star.norm() == 0:
        raise InvalidArgumentError("The key k* at the subject's last token is zero or not finite; pick another layer.")
    W = mlp_weights(model, layer)
    b_out = W.b_out.detach().double() if W.b_out is not None else torch.zeros(W.W_out.shape[1], dtype=torch.float64, device=device)
    v_init = k_star @ W.W_out.detach().double() + b_out
    v_norm = v_init.norm()

    nll_r = torch.tensor([x[0] for x in nll_reads], device=device)
    nll_p = torch.tensor([x[1] for x in nll_reads], device=device)
    nll_t = torch.tensor([x[2] for x in nll_reads], device=device)
    first_ctx = [i for i, x in enumerate(nll_reads) if x[0] == 0]

    delta = torch.zeros(v_init.shape[0], dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)

    def add_delta(output):
        return output + mask * delta.to(output.dtype)

    trace: list[list[float]] = []
    kl_init: Tensor | None = None
    handle = add_mlp_output_hook(model, layer, add_delta)
    try:
        with torch.enable_grad():
            for it in range(hparams.v_num_grad_steps):
                resid = continue_from(model, resid_pre, layer)
                logp = final_logits(model, resid[nll_r, nll_p]).float().log_softmax(-1)
                tok_logp = logp.gather(1, nll_t[:, None])[:, 0]
                if it == 0 and first_ctx and bool((logp[first_ctx].argmax(-1) == nll_t[first_ctx]).all()):
                    raise AlreadySatisfiedError(
                        f"The model already answers {target_new!r} to {request.prompt!r} (greedy): "
                        "target_new equals its current answer, so there is nothing to edit."
                    )
                kl_logp = final_logits(model, resid[kl_row, kl_pos][None]).float().log_softmax(-1)
                if kl_init is None:
                    kl_init = kl_logp.detach()
                nll = -tok_logp.mean()
                kl = hparams.kl_factor * (kl_logp.exp() * (kl_logp - kl_init)).sum(-1).mean()
                wd = hparams.v_weight_decay * delta.norm() / (v_norm.float() ** 2)
                loss = nll + kl + wd
                trace.append([loss.item(), nll.item(), kl.item(), wd.item(), tok_logp.exp().mean().item()])
                if verbose:
                    print(f"step {it}: loss {loss.item():.3f} = nll {nll.item():.3f} + kl {kl.item():.3f} + wd {wd.item():.3f}")
                if loss.item() < hparams.early_stop_loss or it == hparams.v_num_grad_steps - 1:
                    break
                (grad,) = torch.autograd.grad(loss, delta)
                opt.zero_grad()
                delta.grad = grad
                opt.step()
                with torch.no_grad():
                    max_norm = hparams.clamp_norm_factor * v_norm.float()
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()


    return ValueFit(layer=layer, ctx_keys=ctx_keys, k_star=k_star, v_init=v_init,
                    delta=delta.detach().double(), b_out=b_out,
                    trace=torch.tensor(trace, dtype=torch.float32).reshape(-1, 5))


__all__ = ["ValueFit", "fit_value"]
