"""Predict a ROME edit's interference before making it, from the update's own algebra.

ROME's update of `W_out` (TransformerLens: `out = post @ W_out`) is the rank-one

    ΔW_out = u Λᵀ,   u = C⁻¹k* / ‖C⁻¹k*‖,   Λ = (v* − k*ᵀW_out − b_out) / (uᵀk*),

so any other key k (a `hook_post` activation of the edited layer, at any token of any text) gets

    Δout(k) = kᵀΔW_out = λ(k) · (v* − k*ᵀW_out − b_out),   λ(k) = kᵀC⁻¹k* / k*ᵀC⁻¹k*

added to that layer's MLP output: exactly, not to first order (λ(k*) = 1). λ needs only k* and C;
the size of the change needs v* (ROME's optimisation, run but not applied).

What a key's change does to an answer is read out THROUGH THE REST OF THE NETWORK, to first order:
for a prompt and a margin m = mean log p(answer tokens) − mean log p(competitor tokens)
(teacher-forced, per token, as CounterFact's NS), the predicted change is

    Δm ≈ Σ_pos ∂m/∂out_pos · λ(k_pos)(v* − v_old) = d m(t) / dt at t = 0,

where m(t) is the margin when t·kᵀΔW_out is added at every position (one backward pass over all
prompts). At t = 1 that added change is the applied edit's, so `exact=True` also runs m(1): the
edit's actual effect on the margin, against which the first-order prediction is measured.

Banks (`banks=`) hold what the edit may disturb:
- "neighbourhood": the request's neighbourhood prompts (a `CounterFactRecord` request, or
  `neighbourhood=`), answer = the request's true object, competitor = its new object (NS's rule);
- "known": facts the model answers top-1 (`known_facts=`: Facts, or a file name/path for
  `kvmem.data.load_known_facts`, e.g. "known_1000.json" in `$KVMEM_DATA`; default kvmem's
  thirty built-in facts), competitor = the request's new object; other subjects only;
- "corpus": keys of `corpus_tokens` tokens of the statistics corpus (λ only: no answer to read);
- a `KeyBank` (or a [n, d_mlp] tensor): explicit keys, e.g. earlier edits' k* (`KeyBank.from_edits`).

The risk score (`Interference.risk`): the predicted share of the given prompts the model gets right
(m > 0) whose margin the edit turns (m + Δm ≤ 0), i.e. the predicted drop of NS-style accuracy over
the neighbourhood and known-fact prompts. Only flips toward the edit's new object are counted.
"""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem.core.backend import continue_from, run_to_layer
from kvmem.core.facts import Fact
from kvmem.core.fingerprint import model_fingerprint
from kvmem.core.hooks import add_mlp_output_hook, capture
from kvmem.core.readout import final_logits
from kvmem.core.tokenize import encode, pad_batch, spec_for, target_token_ids
from kvmem.core.weights import check_layer, hook_post_name, mlp_weights
from kvmem.editing.rome import Edit, RomeHparams, compute_rome_edit, rome_hparams
from kvmem.editing.stats import SecondMoment
from kvmem.errors import (InterferenceWarning, InvalidArgumentError, ModelMismatchError, UnknownFactError,
                          UnsafeEditError)

# Risk above which an edit is called unsafe (`Interference.unsafe`, `compute_rome_edit(safe=True)`):
# any predicted flip. Youden's J on the even-case_id half of the factworld validation chose τ = 0
# (docs/interference.md, benchmarks/results/interference/).
RISK_THRESHOLD = 0.0

BANK_NAMES = ("neighbourhood", "known", "corpus")


@dataclass(frozen=True)
class KeyBank:
    """Explicit keys of one MLP layer (`hook_post` activations, [n, d_mlp]) to predict λ for.

    `model_fingerprint` / `layer`: where the keys come from (checked against the model and layer
    when given). `labels`: one name per key (default "0", "1", ...)."""

    name: str
    keys: Float[Tensor, "n d_mlp"] = field(repr=False)
    layer: int | None = None
    model_fingerprint: str | None = field(default=None, repr=False)
    labels: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_edits(cls, edits: Sequence[Edit], name: str = "edits") -> "KeyBank":
        """The k* of earlier edits (all of one layer and one model), labelled by their subjects."""
        edits = list(edits)
        if not edits:
            raise InvalidArgumentError("KeyBank.from_edits needs at least one edit.")
        layers = {e.layer for e in edits}
        fps = {e.model_fingerprint for e in edits}
        if len(layers) != 1:
            raise InvalidArgumentError(f"The edits are of several layers {sorted(layers)}; make one bank per layer.")
        return cls(name, torch.stack([e.k_star.double() for e in edits]), layer=layers.pop(),
                   model_fingerprint=fps.pop() if len(fps) == 1 else None,
                   labels=tuple(e.request.subject for e in edits))


@dataclass(frozen=True)
class PromptEffect:
    """One prompt's margin m = mean log p(answer) − mean log p(competitor) (nats/token), its
    first-order predicted change, the applied edit's change (NaN unless computed), and the
    largest |λ| over the prompt's non-start keys."""

    bank: str
    prompt: str
    answer: str
    competitor: str
    margin: float
    predicted: float
    exact: float
    lam_max: float

    @property
    def flips(self) -> bool:
        return self.margin > 0 and self.margin + self.predicted <= 0


@dataclass(frozen=True)
class Interference:
    """What a ROME edit would do to other keys and prompts (module docstring), the edit not applied.

    `lam`: bank name → λ of each key of that bank (for prompt banks, every non-start position of
    every prompt); `effects`: one `PromptEffect` per prompt of the prompt banks; `change_norm` =
    ‖v* − v_old‖ (the change k* gets; key k gets |λ(k)| times it); `edit`: the edit predicted
    (apply it with `edited(model, result.edit)`); `risk`: see the module docstring."""

    request: Fact
    layer: int
    change_norm: float
    risk: float
    threshold: float
    n_known: int
    n_known_flips: int
    lam: dict = field(repr=False)
    effects: tuple[PromptEffect, ...] = field(repr=False)
    edit: Edit = field(repr=False)

    @property
    def unsafe(self) -> bool:
        return self.risk > self.threshold

    @property
    def lam_max(self) -> float:
        vals = [float(v.abs().max()) for v in self.lam.values() if v.numel()]
        return max(vals) if vals else float("nan")

    def lam_quantiles(self, qs: Sequence[float] = (0.5, 0.9, 0.99, 1.0)) -> dict:
        """bank → {q: quantile of |λ|} over that bank's keys."""
        out = {}
        for name, v in self.lam.items():
            a = v.abs().double()
            out[name] = {q: float(torch.quantile(a, q)) if a.numel() else float("nan") for q in qs}
        return out

    def layer_change(self, keys: Float[Tensor, "n d_mlp"]) -> Float[Tensor, "n d_model"]:
        """The exact change of the edited layer's MLP output for `keys`: λ(k)(v* − v_old) = kᵀΔW_out."""
        return keys.double().cpu() @ self.edit.delta(torch.float64)

    def bank_summary(self, bank: str) -> dict:
        """Predicted (and, if computed, exact) accuracy drop and mean margin change on one prompt bank."""
        eff = [e for e in self.effects if e.bank == bank]
        right = [e for e in eff if e.margin > 0]
        out = {"n": len(eff), "n_right": len(right),
               "pred_drop": sum(e.margin > 0 for e in eff) / len(eff) - sum(e.margin + e.predicted > 0 for e in eff) / len(eff) if eff else float("nan"),
               "pred_mean_change": sum(e.predicted for e in eff) / len(eff) if eff else float("nan"),
               "lam_max": max((e.lam_max for e in eff), default=float("nan"))}
        if eff and all(e.exact == e.exact for e in eff):
            out["exact_drop"] = (sum(e.margin > 0 for e in eff) - sum(e.margin + e.exact > 0 for e in eff)) / len(eff)
            out["exact_mean_change"] = sum(e.exact for e in eff) / len(eff)
        return out

    def summary(self) -> dict:
        row = {"subject": self.request.subject, "layer": self.layer, "risk": self.risk, "unsafe": self.unsafe,
               "lam_max": self.lam_max, "change_norm": self.change_norm, "n_known": self.n_known,
               "n_known_flips": self.n_known_flips}
        for name, qs in self.lam_quantiles((0.5, 0.9, 1.0)).items():
            row.update({f"lam_q{int(100 * q)}_{name}": v for q, v in qs.items()})
        return row

    def to_frame(self):
        """One row per prompt of the prompt banks (margin, predicted and exact change, λ max, flip)."""
        import pandas as pd

        return pd.DataFrame([{**e.__dict__, "flips": e.flips} for e in self.effects])

    def keys_frame(self):
        """|λ| quantiles per bank (rows: banks)."""
        import pandas as pd

        return pd.DataFrame(self.lam_quantiles()).T.rename_axis("bank")

    def plot(self, ax=None):
        """Two panels: |λ| per bank (box plot, log scale) and the predicted vs unedited margins."""
        from kvmem.viz import figure_axes

        fig, axes = figure_axes(ax, 2, figsize=(10, 3.4))
        names = [n for n, v in self.lam.items() if v.numel()]
        axes[0].boxplot([self.lam[n].abs().clamp_min(1e-12).numpy() for n in names], labels=names)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("|λ|")
        axes[0].set_title("leakage of the update per key", fontsize=9)
        for bank in sorted({e.bank for e in self.effects}):
            eff = [e for e in self.effects if e.bank == bank]
            axes[1].scatter([e.margin for e in eff], [e.margin + e.predicted for e in eff], s=10, label=bank)
        axes[1].axhline(0, color="k", linewidth=0.5)
        axes[1].axvline(0, color="k", linewidth=0.5)
        axes[1].set_xlabel("margin before (nats/token)")
        axes[1].set_ylabel("predicted margin after")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"{self.request.subject!r} at layer {self.layer}: risk {self.risk:.2f}", fontsize=10)
        fig.tight_layout()
        return fig

    def show(self):
        from kvmem.viz import HTMLView

        rows = "".join(
            f"<tr><td>{html.escape(e.bank)}</td><td>{html.escape(e.prompt)}</td><td>{html.escape(e.answer)}</td>"
            f"<td>{e.margin:+.2f}</td><td>{e.predicted:+.2f}</td><td>{e.lam_max:.3f}</td>"
            f"<td>{'flips' if e.flips else ''}</td></tr>" for e in self.effects)
        qs = "; ".join(f"{n}: " + ", ".join(f"q{int(100 * q)} {v:.3g}" for q, v in d.items())
                       for n, d in self.lam_quantiles().items())
        verdict = "UNSAFE" if self.unsafe else "safe"
        return HTMLView(
            '<div style="font-family:sans-serif;font-size:13px">'
            f"Edit of <b>{html.escape(self.request.subject)}</b> at layer {self.layer}: risk <b>{self.risk:.2f}</b> "
            f"({verdict}, threshold {self.threshold:g}); known facts predicted to flip {self.n_known_flips}/{self.n_known}; "
            f"‖v*−v_old‖ {self.change_norm:.3g}<br>|λ| {html.escape(qs)}"
            '<table style="border-collapse:collapse;margin:6px 0"><tr><th>bank</th><th>prompt</th><th>answer</th>'
            f"<th>margin</th><th>predicted Δ</th><th>max |λ|</th><th></th></tr>{rows}</table></div>")

    def __repr__(self) -> str:
        return (f"Interference({self.request.subject!r}, layer={self.layer}, risk={self.risk:.3f}, "
                f"unsafe={self.unsafe}, lam_max={self.lam_max:.3f}, known flips {self.n_known_flips}/{self.n_known})")


# --- keys and λ ----------------------------------------------------------------------------

def leakage(edit: Edit, keys: Float[Tensor, "n d_mlp"]) -> Float[Tensor, "n"]:
    """λ(k) = kᵀu / k*ᵀu = kᵀC⁻¹k* / k*ᵀC⁻¹k* for each key (u = the edit's C⁻¹k* direction)."""
    u = edit.u.double()
    return keys.double().cpu() @ u / float(edit.k_star.double() @ u)


def corpus_keys(model, layer: int, corpus, n_tokens: int, *, max_len: int = 128) -> Float[Tensor, "n d_mlp"]:
    """`n_tokens` keys (`hook_post` of `layer`) of the corpus's first non-start tokens."""
    from kvmem.editing.stats import batch_keys, corpus_token_rows, length_batches

    rows, _, _ = corpus_token_rows(model, corpus, n_tokens, max_len)
    out = [K.detach().double().cpu() for K in batch_keys(model, layer, length_batches(rows, 2048))]
    return torch.cat(out) if out else torch.zeros(0, int(model.cfg.d_mlp), dtype=torch.float64)


def _check_key_bank(model, bank: KeyBank, layer: int) -> None:
    d_mlp = int(model.cfg.d_mlp)
    if bank.keys.ndim != 2 or bank.keys.shape[1] != d_mlp:
        raise ModelMismatchError(
            f"Key bank {bank.name!r} holds keys of shape {tuple(bank.keys.shape)}; this model's keys are "
            f"[n, {d_mlp}]: the bank is of another model (or not keys). Take keys from this model.")
    if bank.keys.shape[0] == 0:
        raise InvalidArgumentError(f"Key bank {bank.name!r} is empty; pass at least one key.")
    if bank.layer is not None and bank.layer % model.cfg.n_layers != layer:
        raise InvalidArgumentError(f"Key bank {bank.name!r} holds layer {bank.layer}'s keys; the edit is at layer {layer}.")
    if bank.model_fingerprint and bank.model_fingerprint != model_fingerprint(model):
        raise ModelMismatchError(f"Key bank {bank.name!r} was taken from other model weights (fingerprint mismatch).")
    if not torch.isfinite(bank.keys).all():
        raise InvalidArgumentError(f"Key bank {bank.name!r} holds NaN or inf values.")


# --- prompts: margins and their first-order change -----------------------------------------

def prompt_effects(model, edit: Edit, items: Sequence[tuple[str, str, str]], *, exact: bool = False,
                   batch_size: int = 16) -> list[tuple[float, float, float, Tensor]]:
    """Per (prompt, answer, competitor): the margin m (mean log p(answer) − mean log p(competitor),
    per token, teacher-forced), dm/dt at t = 0 when t·kᵀΔW_out is added to the edit layer's MLP
    output at every position (the first-order prediction), m(1) − m(0) if `exact` (else NaN: the
    applied edit's change), and λ of the prompt's non-start keys."""
    spec = spec_for(model)
    layer = edit.layer
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    u = edit.u.to(device, dtype)
    lam_vec = edit.lam.to(device, dtype)
    k_u = float(edit.k_star.double() @ edit.u.double())
    # two rows per item: prompt + answer, prompt + competitor; each item's score is the + row's
    # mean log-prob minus the − row's
    rows, reads, n_prompt = [], [], []
    for prompt, answer, comp in items:
        ids = encode(spec, prompt)
        for sign, target in ((1.0, answer), (-1.0, comp)):
            tids = target_token_ids(spec, prompt, target)
            rows.append(ids + tids[:-1])
            reads.append([(len(ids) - 1 + j, t, sign / len(tids)) for j, t in enumerate(tids)])
            n_prompt.append(len(ids))
    start = 1 if spec.prepends_bos and spec.bos_id is not None else 0
    out = []
    for s in range(0, len(rows), 2 * batch_size):
        rb, rd = rows[s : s + 2 * batch_size], reads[s : s + 2 * batch_size]
        batch = pad_batch(rb, spec.pad_id)
        tokens = batch.tokens.to(device)
        got: dict[str, Tensor] = {}
        resid_name, post = f"blocks.{layer}.hook_resid_pre", hook_post_name(model, layer)
        with torch.no_grad(), model.hooks(fwd_hooks=[(resid_name, capture(got, "resid")), (post, capture(got, "k"))]):
            run_to_layer(model, tokens, layer + 1)
        coef = (got["k"].detach() @ u)  # [row, pos]: kᵀu, the update's weight at each position
        r_idx = torch.tensor([i for i, r in enumerate(rd) for _ in r], device=device)
        p_idx = torch.tensor([p for r in rd for p, _, _ in r], device=device)
        t_idx = torch.tensor([t for r in rd for _, t, _ in r], device=device)
        w = torch.tensor([x for r in rd for _, _, x in r], device=device, dtype=torch.float64)

        def scores(t: Tensor) -> Tensor:
            handle = add_mlp_output_hook(model, layer, lambda o: o + (t[:, None, None] * coef[..., None]).to(o.dtype) * lam_vec)
            try:
                resid = continue_from(model, got["resid"], layer)
            finally:
                handle.remove()
            logp = final_logits(model, resid[r_idx, p_idx]).double().log_softmax(-1)
            per_read = logp.gather(1, t_idx[:, None])[:, 0] * w
            return torch.zeros(len(rb), dtype=torch.float64, device=device).index_add(0, r_idx, per_read)

        t0 = torch.zeros(len(rb), dtype=dtype, device=device, requires_grad=True)
        with torch.enable_grad():
            base = scores(t0)
            (grad,) = torch.autograd.grad(base.sum(), t0)  # rows are independent: d base_r / d t_r
        if exact:
            with torch.no_grad():
                after = scores(torch.ones(len(rb), dtype=dtype, device=device)) - base.detach()
        for i in range(0, len(rb), 2):
            lam_keys = (coef[i, start : n_prompt[s + i]].double() / k_u).cpu()
            out.append((float(base[i].detach() + base[i + 1].detach()), float(grad[i] + grad[i + 1]),
                        float(after[i] + after[i + 1]) if exact else float("nan"), lam_keys))
    return out


# --- the prediction ------------------------------------------------------------------------

def _known_bank(model, request: Fact, known_facts, n_known: int) -> list[Fact]:
    from kvmem.data import builtin_facts, load_known_facts
    from kvmem.recall import answered_facts

    if known_facts is None:
        facts = builtin_facts()
    elif isinstance(known_facts, (str, bytes)) or hasattr(known_facts, "__fspath__"):
        facts = load_known_facts(known_facts)
    else:
        facts = list(known_facts)
    new = request.target("new").strip()
    facts = [f for f in facts if f.subject != request.subject and f.target_true and f.target_true.strip() != new]
    return answered_facts(model, facts, progress=False)[:n_known] if facts else []


def predict_interference(
    model,
    request,
    layer: int | None = None,
    *,
    banks: Sequence | str | KeyBank | Tensor = ("neighbourhood", "known"),
    stats: SecondMoment | Tensor | None = None,
    hparams: RomeHparams | None = None,
    edit: Edit | None = None,
    prefixes: Sequence[str] | None = None,
    neighbourhood: Sequence[str] | None = None,
    known_facts=None,
    n_known: int = 50,
    corpus=None,
    corpus_tokens: int = 2000,
    exact: bool = False,
    require_known: bool = True,
    threshold: float = RISK_THRESHOLD,
) -> Interference:
    """Predict what the ROME edit of `request` at `layer` does to other keys and prompts, without
    applying it (module docstring). Does not change the model.

    `request`: a `Fact` with `target_new` (or a `CounterFactRecord`, whose neighbourhood prompts
    then form the "neighbourhood" bank). `layer`: the edit layer (default: the preset's). `stats`,
    `hparams`, `prefixes`: as `compute_rome_edit`, which computes k* and v*; or pass `edit=` (an
    edit already computed for this model and request) to skip that. `banks`: names from
    `BANK_NAMES` and/or `KeyBank`s / [n, d_mlp] tensors. `exact`: also compute each prompt's change
    under the applied edit. `require_known`: raise `UnknownFactError` when the model does not
    answer the request's true object (top-1): there is then no fact to rewrite, only one to add.
    """
    from kvmem.data import CounterFactRecord
    from kvmem.recall import fact_recall

    if isinstance(request, CounterFactRecord):
        if neighbourhood is None:
            neighbourhood = list(request.neighborhood_prompts)
        request = request.request
    if not isinstance(request, Fact):
        raise InvalidArgumentError(f"request must be a kvmem.Fact or CounterFactRecord, got {type(request).__name__}.")
    if edit is not None and not isinstance(edit, Edit):
        raise InvalidArgumentError(
            f"edit= must be a rank-one ROME Edit (compute_rome_edit, also with null_space=), got "
            f"{type(edit).__name__}: the prediction is derived for one rank-one update (MEMIT/AlphaEdit: not implemented).")
    hparams = hparams or rome_hparams(model)
    if layer is None:
        layer = edit.layer if edit is not None else hparams.layer
    if layer is not None:
        layer = check_layer(model, layer)
    if isinstance(banks, (str, KeyBank, Tensor)):
        banks = [banks]
    banks = list(banks)
    if not banks:
        raise InvalidArgumentError(f"banks is empty; pass some of {BANK_NAMES} or KeyBank(...)s.")
    key_banks: list[KeyBank] = []
    for b in banks:
        if isinstance(b, Tensor):
            b = KeyBank(f"keys{len(key_banks)}", b)
        if isinstance(b, KeyBank):
            key_banks.append(b)
        elif b not in BANK_NAMES:
            raise InvalidArgumentError(f"Unknown bank {b!r}; use {BANK_NAMES} or a KeyBank / [n, d_mlp] tensor.")
    if "neighbourhood" in banks and not neighbourhood:
        raise InvalidArgumentError(
            "The 'neighbourhood' bank needs the request's neighbourhood prompts: pass a CounterFactRecord "
            "as request, or neighbourhood=[...] (prompts whose answer is the request's true object).")
    if "neighbourhood" in banks or "known" in banks:
        request.target("true")  # the answer neighbours keep; EmptyTargetError when missing
    if require_known:
        request.target("true")
        if not bool(fact_recall(model, [request], progress=False).known[0]):
            raise UnknownFactError(
                f"The model does not answer {request.target_true!r} to {request.prompt!r} (top-1), so the edit "
                "adds a fact rather than rewriting one. Predict for facts the model knows (kvmem.fact_recall), "
                "or pass require_known=False.")
    if edit is None:
        edit = compute_rome_edit(model, request, layer=layer, stats=stats, hparams=hparams, prefixes=prefixes)
    elif edit.request.subject != request.subject or edit.request.target_new != request.target_new:
        raise InvalidArgumentError("edit= was computed for another request; pass the request it edits.")
    elif layer is not None and edit.layer != layer:
        raise InvalidArgumentError(f"edit= is at layer {edit.layer}, not {layer}.")
    layer = edit.layer
    for kb in key_banks:
        _check_key_bank(model, kb, layer)

    W = mlp_weights(model, layer)
    v_old = edit.k_star.double() @ W.W_out.detach().double().cpu()
    if W.b_out is not None:
        v_old = v_old + W.b_out.detach().double().cpu()
    change_norm = float((edit.v_star.double() - v_old).norm())

    new = request.target("new")
    items: list[tuple[str, str, str, str]] = []
    if "neighbourhood" in banks:
        items += [("neighbourhood", p, request.target("true"), new) for p in neighbourhood]
    n_known_facts = 0
    if "known" in banks:
        known = _known_bank(model, request, known_facts, n_known)
        if not known:
            raise InvalidArgumentError(
                "The 'known' bank is empty: the model answers none of the known facts given (other subjects, "
                "answers other than target_new). Pass known_facts=... the model knows (compute_rome_edit: safe_facts=...), "
                "or leave 'known' out.")
        items += [("known", f.prompt, f.target_true, new) for f in known]
        n_known_facts = len(known)
    lam: dict[str, Tensor] = {}
    effects: list[PromptEffect] = []
    if items:
        res = prompt_effects(model, edit, [(p, a, c) for _, p, a, c in items], exact=exact)
        for (bank, p, a, c), (m, d, x, lk) in zip(items, res):
            effects.append(PromptEffect(bank, p, a, c, m, d, x, float(lk.abs().max()) if lk.numel() else 0.0))
            lam[bank] = torch.cat([lam.get(bank, torch.zeros(0, dtype=torch.float64)), lk])
    if "corpus" in banks:
        keys = corpus_keys(model, layer, corpus if corpus is not None else hparams.mom2_corpus, corpus_tokens)
        if keys.shape[0] == 0:
            raise InvalidArgumentError("The 'corpus' bank is empty: the corpus yielded no tokens.")
        lam["corpus"] = leakage(edit, keys)
    for kb in key_banks:
        lam[kb.name] = leakage(edit, kb.keys)

    right = [e for e in effects if e.margin > 0]
    risk = sum(e.flips for e in right) / len(right) if right else 0.0
    return Interference(
        request=request, layer=layer, change_norm=change_norm, risk=float(risk), threshold=float(threshold),
        n_known=n_known_facts, n_known_flips=sum(e.flips for e in effects if e.bank == "known"),
        lam=lam, effects=tuple(effects), edit=edit)


def warn_or_refuse(result: Interference, *, safe: bool) -> None:
    """Warn (`InterferenceWarning`) when `result.unsafe`; with `safe=True` refuse instead
    (`UnsafeEditError`)."""
    if not result.unsafe:
        return
    msg = (f"The edit of {result.request.subject!r} at layer {result.layer} is predicted to turn "
           f"{result.risk:.0%} of the prompts it was checked on (risk > threshold {result.threshold:g}; "
           f"known facts flipping: {result.n_known_flips}/{result.n_known}).")
    if safe:
        raise UnsafeEditError(msg + " Try another layer (layer='least-interference') or a weaker edit; "
                              "pass safe=False to make it anyway.")
    warnings.warn(msg, InterferenceWarning, stacklevel=3)


# --- choosing the layer ------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerChoice:
    """`least_interference_edit`'s candidates: per layer the predicted risk, whether the edit
    reaches its target (ES: the request's prompt ranks the new object over the true one with the
    edit in place, read exactly), and the chosen layer (lowest risk among those reaching it; ties:
    the smaller |λ| maximum, then the lower layer)."""

    layer: int
    layers: tuple[int, ...]
    risks: tuple[float, ...]
    reaches: tuple[bool, ...]
    lam_max: tuple[float, ...]
    predictions: tuple[Interference, ...] = field(repr=False)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "risk": self.risks, "reaches": self.reaches,
                             "lam_max": self.lam_max, "chosen": [l == self.layer for l in self.layers]})

    @property
    def edit(self) -> Edit:
        return self.predictions[self.layers.index(self.layer)].edit


def least_interference_edit(
    model,
    request,
    *,
    stats,
    layers: Sequence[int] | None = None,
    hparams: RomeHparams | None = None,
    prefixes: Sequence[str] | None = None,
    banks: Sequence | str = ("neighbourhood", "known"),
    **kwargs,
) -> LayerChoice:
    """ROME's edit of `request` at each of `layers` (default: the first half of the model), each
    checked with `predict_interference` (`banks`, `kwargs`), and the layer with the lowest risk among
    those whose edit reaches the new object (`LayerChoice`; `.edit` is that layer's edit, not applied).
    `stats`: a mapping or callable layer → `SecondMoment` (or C). Raises `InvalidArgumentError` when no
    layer reaches the edit."""
    from kvmem.data import CounterFactRecord

    hparams = hparams or rome_hparams(model)
    n = int(model.cfg.n_layers)
    layers = list(range((n + 1) // 2)) if layers is None else [check_layer(model, l) for l in layers]
    if not layers:
        raise InvalidArgumentError("layers is empty; pass the candidate layers.")
    get = stats if callable(stats) else (lambda l: stats[l])
    fact = request.request if isinstance(request, CounterFactRecord) else request
    kwargs.setdefault("require_known", False)
    preds, reaches = [], []
    for l in layers:
        e = compute_rome_edit(model, fact, layer=l, stats=get(l), hparams=hparams, prefixes=prefixes)
        preds.append(predict_interference(model, request, edit=e, banks=banks, **kwargs))
        # ES with the edit in place: the new object over the true one on the request's own prompt
        (m, _, x, _), = prompt_effects(model, e, [(fact.prompt, fact.target("new"), fact.target("true"))], exact=True)
        reaches.append(m + x > 0)
    ok = [i for i, r in enumerate(reaches) if r]
    if not ok:
        raise InvalidArgumentError(f"No layer of {layers} reaches the edit (ES); try other layers.")
    best = min(ok, key=lambda i: (preds[i].risk, preds[i].lam_max, layers[i]))
    return LayerChoice(layers[best], tuple(layers), tuple(p.risk for p in preds), tuple(reaches),
                       tuple(p.lam_max for p in preds), tuple(preds))


__all__ = ["least_interference_edit", "LayerChoice", "predict_interference", "Interference", "PromptEffect", "KeyBank", "leakage", "corpus_keys",
           "prompt_effects", "RISK_THRESHOLD", "InterferenceWarning", "BANK_NAMES", "warn_or_refuse"]
