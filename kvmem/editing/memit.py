"""MEMIT (Meng et al., ICLR 2023) and AlphaEdit (Fang et al., ICLR 2025): many facts written at
once into the MLPs of several layers.

For requests i = 1..n and layers l₁ < … < l_m (L = l_m):

1. v* at L (ROME's optimisation, `kvmem.editing.values.fit_value`): δᵢ added to MLP L's output at
   the subject's last token makes the model say target_newᵢ; zᵢ = the residual stream after block L
   at the subject's last token of the plain prompt with δᵢ added (MEMIT's target; the MLP output
   and the residual differ where a post-MLP norm sits between them, as in Gemma).
2. For l = l₁ … l_m in order, on the model carrying the updates of the layers before:
   Kₗ = keys at l (rows, averaged over the context prefixes, recomputed now),
   Rₗ = (zᵢ − hᵢ) / (layers left, l included)   with hᵢ the residual after L now,
   MEMIT:      ΔWₗ = (λ Cₗ + KₗᵀKₗ)⁻¹ Kₗᵀ Rₗ                     (λ = mom2_update_weight)
   AlphaEdit:  ΔWₗ = (Pₗ(KₗᵀKₗ + Kpₗᵀ Kpₗ) + α I)⁻¹ Pₗ Kₗᵀ Rₗ       (α = l2; Pₗ: `null_space(Cₗ)`;
               Kp: keys of the edits made before, whose outer products the caller accumulates)
   in kvmem's orientation (`out = post @ W_out`, ΔW [d_mlp, d_model]). A post-MLP norm (Gemma)
   is passed by first order: Rₗ is divided by the norm's gain and multiplied by its scale at l.

With one request and one layer MEMIT is ROME shrunk: by Sherman–Morrison
(λC + kkᵀ)⁻¹k = C⁻¹k / (λ + kᵀC⁻¹k), so ΔW_MEMIT = s/(λ + s) · ΔW_ROME with s = kᵀC⁻¹k (same
direction; equal as λ → 0), given the same δ (tests/test_memit.py checks it). AlphaEdit's
solution lies in range P (α ΔW = P(KᵀR − (KᵀK + KpᵀKp)ΔW)), so a preserved key k0 with ‖Pk0‖ ≈ 0
sees |k0ᵀΔW| ≤ ‖Pk0‖‖ΔW‖₂.

Hyperparameters: `MemitHparams`; `MEMIT_PRESETS` hold the reference code's and kvmem's per model.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from kvmem.core.backend import backend_of, run_to_layer
from kvmem.core.facts import Fact, tokenize_fact
from kvmem.core.fingerprint import fingerprints
from kvmem.core.hooks import add_mlp_output_hook, capture
from kvmem.core.tokenize import pad_batch, spec_for
from kvmem.core.weights import check_layer, hook_post_name, mlp_post_norm, mlp_weights, norm_gain, post_norm_scale_name
from kvmem.editing.multi_edit import MultiLayerEdit
from kvmem.editing.nullspace import ALPHAEDIT_THRESHOLD, NullSpace, null_space
from kvmem.editing.requests import screen_requests
from kvmem.editing.rome import RomeHparams, _check_request, context_prefixes, rome_hparams
from kvmem.editing.stats import SecondMoment, checked_statistics
from kvmem.editing.values import _subject_occurrence, fit_value
from kvmem.errors import AlreadySatisfiedError, InvalidArgumentError

KEY_ROWS_PER_PASS = 256  # context rows per forward when reading keys (memory, not results)


@dataclass(frozen=True)
class MemitHparams:
    """MEMIT's / AlphaEdit's settings.

    layers: the MLPs to edit, in order (v* is fitted at the last). None: the model's preset.
    mom2_update_weight: λ, the weight of the preserved keys' second moment C against the new keys
        (MEMIT code: 20,000 for GPT-2 XL, d_mlp 6,400; 15,000 for GPT-J, d_mlp 16,384). Since
        E[kᵀC⁻¹k] = d_mlp for keys drawn like C's, λ / d_mlp is the scale-free quantity (3.1 and
        0.92 there); presets here keep λ ≈ d_mlp.
    value: the v* optimisation settings (a `RomeHparams`: prefixes, steps, lr, clamp, KL, seed).
        kvmem's δ lives at the MLP output as in its ROME (MEMIT's at the residual stream, with the
        clamp 0.75 × ‖residual‖); the clamp is relative to ‖MLP output‖ here, so the model's ROME
        preset's value settings apply unchanged.
    null_space: AlphaEdit's projection (True) or plain MEMIT (False).
    nullspace_threshold, nullspace_relative: see `kvmem.editing.nullspace` (AlphaEdit: 2e-2 absolute).
    l2: AlphaEdit's ridge α (its code's `L2`: 10 for GPT-J and Llama3-8B; the paper's formula has 1).
    spread: how the residual gap z − h is shared among the layers still to edit. "equal" (MEMIT):
        1/(layers left) each. "gain": in proportion to the size of each layer's post-MLP norm gain ‖g‖
        (models with a norm between the MLP and the residual, as Gemma: such a layer's output has a
        fixed RMS times g, so it can move the residual only about as far as ‖g‖, and an equal share
        overshoots what the small-gain early layers can deliver); layers without such a norm count 1.
    layer_source: why these layers.
    """

    layers: tuple[int, ...] | None = None
    mom2_update_weight: float = 15000.0
    value: RomeHparams = field(default_factory=lambda: RomeHparams(clamp_norm_factor=0.75, v_num_grad_steps=25))
    null_space: bool = False
    nullspace_threshold: float = ALPHAEDIT_THRESHOLD
    nullspace_relative: bool = False
    l2: float = 10.0
    spread: str = "equal"
    layer_source: str = "default"

    def __post_init__(self) -> None:
        if self.layers is not None and len(self.layers) == 0:
            raise InvalidArgumentError("MemitHparams.layers is empty; give at least one layer (or None for the preset).")
        if not self.mom2_update_weight > 0 or not self.l2 > 0 or not self.nullspace_threshold > 0:
            raise InvalidArgumentError("mom2_update_weight, l2 and nullspace_threshold must be positive.")
        if self.spread not in ("equal", "gain"):
            raise InvalidArgumentError(f"MemitHparams.spread must be 'equal' or 'gain', got {self.spread!r}.")

    @classmethod
    def from_dict(cls, d: dict) -> "MemitHparams":
        d = dict(d)
        value = RomeHparams.from_dict(d.pop("value"))
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(value=value, **d)


def _value_preset(name: str) -> RomeHparams:
    return replace(rome_hparams(name), layer=None)


MEMIT_PRESETS: dict[str, MemitHparams] = {
    "gpt2-xl": MemitHparams(layers=(13, 14, 15, 16, 17), mom2_update_weight=20000.0,
                            value=RomeHparams(clamp_norm_factor=0.75, v_num_grad_steps=20),
                            layer_source="MEMIT code hparams/MEMIT/gpt2-xl.json"),
    "gpt-j-6b": MemitHparams(layers=(3, 4, 5, 6, 7, 8), mom2_update_weight=15000.0,
                             value=RomeHparams(clamp_norm_factor=0.75, v_num_grad_steps=25),
                             layer_source="MEMIT code hparams/MEMIT/EleutherAI_gpt-j-6B.json"),
    # One layer, the tracing peak and ROME's layer 4 (benchmarks/results/tracing/aie_gemma-3-270m.md:
    # the MLP indirect effect at the last subject token is ≥ 90% of its peak over 2-6). Spreading over
    # 2-6 as MEMIT does around GPT-J's peak does not work on Gemma's blocks: a post-feedforward RMSNorm
    # fixes the RMS of each MLP's contribution to the residual, so a layer can rotate its output but
    # not add an arbitrary share of the gap z − h; one batch of 8 CounterFact requests left 0.90 of the
    # gap over 2-6 (ES 37.5), 0.71 over 4-6, 0.39 over 5-6, and 0.19 at layer 4 alone with λ = 256
    # (ES 100, PS 62.5, NS 75.0 vs 81.2 unedited; benchmarks/results/editing/memit_layers_gemma-3-270m.md).
    # λ = 256 = d_mlp / 8: at λ = d_mlp a lone key is inserted by s/(λ+s) ≈ 0.6 (median s 2,965 at
    # layer 4, benchmarks/results/stress/nullspace_gemma-3-270m.md) and ES was 62.5. AlphaEdit's
    # α = 1 for the reason given for factworld below (median ‖Pk‖² 14.6 at layer 4: 0.59 inserted
    # with α = 10, 0.94 with α = 1). v* settings = the ROME preset's (norm clamp 1 on the MLP output).
    "gemma-3-270m": MemitHparams(
        layers=(4,), mom2_update_weight=256.0, value=_value_preset("gemma-3-270m"), l2=1.0,
        layer_source="the MLP tracing peak and ROME layer (4) alone: spreading over 2-6 fails through "
        "Gemma's post-feedforward norms (benchmarks/results/editing/memit_layers_gemma-3-270m.md)"),
    # factworld's facts are recalled by MLPs 0 and 1 at the subject's last token (window-2 AIE 0.496
    # and 0.498; 0.024 at layer 2, benchmarks/results/tracing/aie_factworld.md); λ = d_mlp. AlphaEdit's
    # ridge α = 1 (the paper's formula) rather than its code's 10: an edit key's null-space part is
    # small here (median ‖Pk‖² 7.1 at layer 0, 2.2 at layer 1, benchmarks/results/stress/
    # nullspace_factworld.md), and a lone key is inserted by the fraction ‖Pk‖² / (α + ‖Pk‖²):
    # 0.18-0.41 per layer with α = 10, 0.69-0.88 with α = 1.
    "factworld": MemitHparams(
        layers=(0, 1), mom2_update_weight=512.0, value=RomeHparams(prefixes=((5, 5), (10, 5))), l2=1.0,
        layer_source="MLP AIE at the last subject token: layers 0-1 carry the recall "
        "(benchmarks/results/tracing/aie_factworld.md)"),
}


def memit_hparams(model_or_name, *, null_space: bool = False) -> MemitHparams:
    """The preset for a model (or name), with AlphaEdit's projection when `null_space`; for a
    model without one: layers = a 5-layer window centred on its ROME layer (MEMIT's GPT-J choice
    around ROME's layer), λ = d_mlp, with a warning."""
    from kvmem.editing.rome import _PRESET_ALIASES

    name = model_or_name if isinstance(model_or_name, str) else getattr(model_or_name.cfg, "model_name", "")
    key = _PRESET_ALIASES.get(str(name).lower(), str(name).lower())
    hp = MEMIT_PRESETS.get(key)
    if hp is None:
        if isinstance(model_or_name, str):
            hp = MemitHparams()
        else:
            cfg = model_or_name.cfg
            centre = rome_hparams(model_or_name).layer
            centre = max(0, round(0.3 * (cfg.n_layers - 1))) if centre is None else centre
            layers = tuple(range(max(0, centre - 2), min(cfg.n_layers, centre + 3)))
            hp = MemitHparams(layers=layers, mom2_update_weight=float(cfg.d_mlp),
                              value=_value_preset(name) if rome_hparams(name).layer is not None else RomeHparams(),
                              layer_source="kvmem: 5 layers around the ROME layer (no preset)")
            warnings.warn(f"No MEMIT preset for {name!r}; editing layers {list(layers)}. Pass layers=... "
                          "(the MLP tracing peak's neighbourhood) to choose.", stacklevel=2)
    return replace(hp, null_space=null_space)


# --- keys and residuals --------------------------------------------------------------------

@dataclass(frozen=True)
class _Rows:
    """Tokenized context rows (request-major) and plain-prompt rows, with subject-last positions."""

    ctx_tokens: list[Tensor]
    ctx_pos: list[int]
    n_ctx: int
    plain_tokens: list[Tensor]
    plain_pos: list[int]


def _tokenize(model, requests: Sequence[Fact], prefixes: Sequence[str]) -> _Rows:
    spec = spec_for(model)
    ct, cp, pt, pp = [], [], [], []
    for r in requests:
        for p in prefixes:
            text = p + r.prompt
            tf = tokenize_fact(spec, Fact(text, r.subject), None, occurrence=_subject_occurrence(text, r.subject, len(p)))
            ct.append(tf.tokens)
            cp.append(tf.subject.last)
        tf = tokenize_fact(spec, Fact(r.prompt, r.subject), None, occurrence=0)
        pt.append(tf.tokens)
        pp.append(tf.subject.last)
    return _Rows(ct, cp, len(prefixes), pt, pp)


def context_keys(model, layer: int, rows: _Rows) -> Float[Tensor, "n d_mlp"]:
    """Each request's key at `layer` (hook_post at the subject's last token), averaged over its contexts."""
    device = next(model.parameters()).device
    name = hook_post_name(model, layer)
    out = []
    for lo in range(0, len(rows.ctx_tokens), KEY_ROWS_PER_PASS):
        toks = rows.ctx_tokens[lo : lo + KEY_ROWS_PER_PASS]
        pos = torch.tensor(rows.ctx_pos[lo : lo + KEY_ROWS_PER_PASS], device=device)
        got: dict[str, Tensor] = {}
        batch = pad_batch(toks, spec_for(model).pad_id)
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, capture(got, "k"))]):
            run_to_layer(model, batch.tokens.to(device), layer + 1)
        out.append(got["k"][torch.arange(len(toks), device=device), pos].double())
    keys = torch.cat(out)
    return keys.reshape(-1, rows.n_ctx, keys.shape[-1]).mean(1)


def _plain_run(model, rows: _Rows, last: int, *, deltas: Tensor | None = None, scale_layer: int | None = None):
    """The residual after block `last` at the subject's last token of the plain prompts ([n, d_model],
    float64), with `deltas[i]` added to MLP `last`'s output there when given; and the post-MLP norm
    scale of `scale_layer` at those positions ([n, 1]) when that layer has one (else None)."""
    device = next(model.parameters()).device
    batch = pad_batch(rows.plain_tokens, spec_for(model).pad_id)
    tokens = batch.tokens.to(device)
    r = torch.arange(tokens.shape[0], device=device)
    pos = torch.tensor(rows.plain_pos, device=device)
    hooks, got = [], {}
    sname = post_norm_scale_name(model, scale_layer) if scale_layer is not None else None
    if sname is not None:
        hooks.append((sname, capture(got, "scale")))
    handle = None
    if deltas is not None:
        add = torch.zeros(tokens.shape[0], tokens.shape[1], deltas.shape[-1], dtype=torch.float64, device=device)
        add[r, pos] = deltas.to(device)

        def add_delta(output):
            return output + add.to(output.dtype)
        handle = add_mlp_output_hook(model, last, add_delta)
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            h = run_to_layer(model, tokens, last + 1)
    finally:
        if handle is not None:
            handle.remove()
    scale = got["scale"][r, pos].double().reshape(-1, 1) if "scale" in got else None
    return h[r, pos].double(), scale


def check_layers(model, layers) -> tuple[int, ...]:
    if layers is None or len(layers) == 0:
        raise InvalidArgumentError("No edit layers: pass layers=[...] (e.g. the preset's, memit_hparams(model).layers).")
    out = tuple(check_layer(model, int(l)) for l in layers)
    if len(set(out)) != len(out) or list(out) != sorted(out):
        raise InvalidArgumentError(f"layers must be distinct and increasing, got {list(layers)}.")
    return out


# --- the edit -----------------------------------------------------------------------------

def solve_update(
    K: Float[Tensor, "n d_mlp"],
    C: Float[Tensor, "d_mlp d_mlp"],
    hparams: MemitHparams,
    *,
    P: Float[Tensor, "d_mlp d_mlp"] | None = None,
    prev_keys: Float[Tensor, "d_mlp d_mlp"] | None = None,
) -> Float[Tensor, "d_mlp n"]:
    """U with ΔW = U R for one layer's keys K (one row per request) and residuals R (float64).

    MEMIT (`hparams.null_space` False): U = (λC + KᵀK)⁻¹Kᵀ, λ = `mom2_update_weight`.
    AlphaEdit: U = (P(KᵀK + Σ KpKpᵀ) + αI)⁻¹ P Kᵀ with P the null-space projector (required) and
    `prev_keys` the earlier edits' Σ KpKpᵀ (None: no earlier edits), α = `l2`. The one solve both
    `compute_memit_edit` and a re-solve of a saved batch at other settings go through.
    """
    K = K.double()
    if hparams.null_space:
        if P is None:
            raise InvalidArgumentError("AlphaEdit's solve needs P, the null-space projector (kvmem.null_space(C).P).")
        P = P.double().to(K.device)
        A = K.T @ K
        if prev_keys is not None:
            A = A + prev_keys.double().to(K.device)
        eye = torch.eye(K.shape[1], dtype=torch.float64, device=K.device)
        return torch.linalg.solve(P @ A + hparams.l2 * eye, P @ K.T)
    C = C.double().to(K.device)
    return torch.linalg.solve(hparams.mom2_update_weight * C + K.T @ K, K.T)


def compute_memit_edit(
    model,
    requests: Sequence[Fact],
    *,
    stats: Mapping[int, SecondMoment | Tensor],
    layers: Sequence[int] | None = None,
    hparams: MemitHparams | None = None,
    null_spaces: Mapping[int, NullSpace | Tensor] | None = None,
    prev_keys: Mapping[int, Tensor] | None = None,
    prefixes: Sequence[str] | None = None,
    skip_satisfied: bool = True,
    verbose: bool = False,
    value_cache: dict | None = None,
    progress: bool = False,
    _fingerprint: str | None = None,
) -> MultiLayerEdit:
    """The MEMIT (or, with `hparams.null_space`, AlphaEdit) edit writing `requests` into `model`
    (module docstring). Leaves the model as it was: it writes each layer's update into the weights
    while solving the next layers (MEMIT's sequence) and restores them bit-exactly before it returns,
    also on an error (so do not run the model from another thread meanwhile). Apply the result with
    `apply_edit` or `edited`.

    `stats`: C per edit layer (`second_moment(model, l, corpus)`; tensors are taken as they are,
    SecondMoments must match the model's fingerprint). `layers`/`hparams`: default the model's
    preset (`memit_hparams`). `null_spaces`: P per layer for AlphaEdit (default: `null_space(C)`
    with the hparams' threshold). `prev_keys`: AlphaEdit's Σ Kp Kpᵀ per layer over earlier edits
    ([d_mlp, d_mlp]; `kvmem.EditSession` keeps it). Requests: a conflict (same subject and
    relation, other target) raises `DuplicateRequestError` naming the indices; duplicates are
    skipped; with `skip_satisfied` those the model already answers are skipped (both reported in
    `edit.skipped`); if none is left, `InvalidArgumentError` lists why. `value_cache`: a dict in
    which v* fits are kept (keyed by request, last layer, value settings and prefixes); pass the same
    dict to several calls on the same unedited weights (a sweep over λ, the spread, or layer sets
    sharing their last layer) to fit each request once. `progress`: a bar over the requests' v*
    fits (the slow part: tens of seconds each for a 270M model on one CPU thread).
    """
    t0 = time.perf_counter()
    requests = list(requests)
    if not requests:
        raise InvalidArgumentError("Empty batch: pass one or more kvmem.Facts with target_new.")
    hp = hparams or memit_hparams(model)
    layers = check_layers(model, hp.layers if layers is None else layers)
    hp = replace(hp, layers=layers)
    keep, skipped = screen_requests(requests)
    for i in keep:
        _check_request(model, requests[i])
    d_mlp = int(model.cfg.d_mlp)
    if _fingerprint is None:
        fp, weights_fp = fingerprints(model)
    else:
        fp, weights_fp = _fingerprint, None
    if not isinstance(stats, Mapping):
        raise InvalidArgumentError("stats must map each edit layer to its C: {layer: second_moment(model, layer, corpus)}.")
    missing = [l for l in layers if l not in stats]
    if missing:
        raise InvalidArgumentError(f"stats has no C for edit layer(s) {missing}; pass one per layer in {list(layers)}.")
    # MEMIT solves λC + KᵀK (C must be invertible); AlphaEdit projects onto C's null space
    Cs = {l: checked_statistics(stats[l], l, d_mlp, fingerprint=fp if _fingerprint is None else None,
                                invertible=not hp.null_space) for l in layers}
    Ps: dict[int, Tensor] = {}
    if hp.null_space:
        for l in layers:
            given = (null_spaces or {}).get(l)
            if given is None:
                given = null_space(Cs[l], threshold=hp.nullspace_threshold, relative=hp.nullspace_relative)
            Ps[l] = (given.P if isinstance(given, NullSpace) else given).double()
    if prefixes is None:
        prefixes = context_prefixes(model, replace(hp.value, layer=layers[-1]))

    # 1. v* at the last layer, one request at a time
    last = layers[-1]
    kept, deltas, traces = [], [], []
    for i in tqdm(keep, desc=f"v* at layer {last}", unit="request", disable=not progress or len(keep) < 2, leave=False):
        key = (repr(requests[i]), last, repr(hp.value), tuple(prefixes), fp)
        try:
            if value_cache is not None and key in value_cache:
                fit = value_cache[key]
            else:
                fit = fit_value(model, requests[i], last, hp.value, prefixes, verbose=verbose)
                if value_cache is not None:
                    value_cache[key] = fit
        except AlreadySatisfiedError as err:
            if not skip_satisfied:
                raise
            skipped.append({"index": i, "subject": requests[i].subject, "skipped": f"already satisfied: {err}"})
            continue
        kept.append(i)
        deltas.append(fit.delta)
        traces.append(fit.trace)
    skipped.sort(key=lambda s: s["index"])
    if not kept:
        raise InvalidArgumentError("Nothing to edit: every request was skipped (" +
                                   "; ".join(f"{s['index']}: {s['skipped']}" for s in skipped[:5]) + ").")
    t_values = time.perf_counter() - t0
    reqs = [requests[i] for i in kept]
    rows = _tokenize(model, reqs, prefixes)
    D = torch.stack(deltas)
    z, _ = _plain_run(model, rows, last, deltas=D)

    # 2. layer by layer, on the model carrying the earlier layers' updates (restored at the end)
    originals = {l: mlp_weights(model, l).W_out.detach().clone() for l in layers}
    # each layer's post-MLP norm gain, once (W_out updates do not change it); None without such a norm
    gains = {l: (norm_gain(model, mlp_post_norm(model, l)) if mlp_post_norm(model, l) is not None else None)
             for l in layers}
    share = {l: 1.0 if hp.spread == "equal" or gains[l] is None else float(gains[l].detach().double().norm())
             for l in layers}
    Us, Vs, Ks, Kafter = [], [], [], []
    try:
        h0 = None
        for j, l in enumerate(layers):
            K = context_keys(model, l, rows)
            h, scale = _plain_run(model, rows, last, scale_layer=l)
            if h0 is None:
                h0 = h
            R = (z - h) / (sum(share[m] for m in layers[j:]) / share[l])  # "equal": / (layers left)
            if scale is not None:  # post-MLP norm at l: first-order inverse of out = g ⊙ m / scale(m)
                g = gains[l]
                if g is not None:
                    # a dimension the norm multiplies by 0 (Gemma-3-270m has them at layers 3 and 4)
                    # cannot be moved through this MLP: left out (the pseudo-inverse), not divided by 0
                    g = g.detach().double().to(R.device)
                    reach = g.abs() > 1e-6 * float(g.abs().max())
                    R = torch.where(reach, R / torch.where(reach, g, torch.ones_like(g)), torch.zeros_like(R))
                R = R * scale
            U = solve_update(K, Cs[l], hp, P=Ps.get(l), prev_keys=(prev_keys or {}).get(l))
            W = mlp_weights(model, l).W_out
            with torch.no_grad():
                W.add_((U @ R).to(W.device).to(W.dtype))
            Us.append(U.cpu())
            Vs.append(R.cpu())
            Ks.append(K.cpu())
        h_end, _ = _plain_run(model, rows, last)
        if hp.null_space:
            Kafter = [context_keys(model, l, rows).cpu() for l in layers]
    finally:
        with torch.no_grad():
            for l, W0 in originals.items():
                mlp_weights(model, l).W_out.copy_(W0)
    gap0 = float((z - h0).norm(dim=-1).mean())
    residual = {"before": 1.0, "after": float((z - h_end).norm(dim=-1).mean()) / gap0 if gap0 > 0 else 0.0,
                "z_gap": gap0}
    total = time.perf_counter() - t0
    return MultiLayerEdit(
        layers=layers, U=tuple(Us), V=tuple(Vs), keys=tuple(Ks), targets=z.cpu(), requests=tuple(reqs),
        method="alphaedit" if hp.null_space else "memit", model_fingerprint=fp, hparams=hp,
        keys_after=tuple(Kafter), skipped=tuple(skipped), residual=residual,
        seconds={"values": t_values, "solve": total - t_values, "total": total},
        weights_fingerprint=weights_fp, backend=backend_of(model),
    )


def memit_statistics(model, hparams: MemitHparams | None = None, *, corpus="wiki", **kwargs) -> dict[int, SecondMoment]:
    """`second_moment` for each of the preset's layers (cached on disk; kwargs pass through)."""
    from kvmem.editing.stats import second_moment

    hp = hparams or memit_hparams(model)
    return {l: second_moment(model, l, corpus, **kwargs) for l in check_layers(model, hp.layers)}


__all__ = ["MemitHparams", "MEMIT_PRESETS", "memit_hparams", "compute_memit_edit", "solve_update",
           "memit_statistics", "context_keys"]
