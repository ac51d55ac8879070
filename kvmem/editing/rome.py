"""ROME: rewrite one fact with a rank-one update of one MLP's `W_out` (Meng et al., 2022).

    k*  = the layer's key (`hook_post`) at the subject's last token, averaged over the prompt
          preceded by random model-generated prefixes;
    v*  = v_init + δ, where v_init = k*ᵀW_out + b_out and δ is optimised so that adding it to the
          MLP output at the subject's last token makes the model say the new object (NLL over the
          prefixed prompts) while "{subject} is a" keeps its prediction (KL), with a weight decay
          and a norm clamp;
    ΔW_out = (C⁻¹k*) Λᵀ with Λ = (v* − k*ᵀW_out − b_out) / ((C⁻¹k*)ᵀk*),

so that k*ᵀ(W_out + ΔW_out) + b_out = v* exactly and any key k with kᵀC⁻¹k* = 0 is untouched.
TransformerLens computes `out = post @ W_out`, so ΔW_out has shape [d_mlp, d_model].

Where the ROME paper and its reference code (kmeng01/rome) disagree, see `RomeHparams`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem import config
from kvmem.core.fingerprint import fingerprints, same_weights
from kvmem.editing.edit_file import read_edit_file, write_edit_file
from kvmem.editing.generate import sample_tokens
from kvmem.editing.stats import SecondMoment, checked_statistics
from kvmem.editing.values import fit_value
from kvmem.errors import CacheError, InvalidArgumentError, ModelMismatchError
from kvmem.core.backend import backend_of
from kvmem.core.facts import Fact, subject_span
from kvmem.core.tokenize import encode, spec_for
from kvmem.core.weights import check_layer, mlp_weights

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class RomeHparams:
    """ROME's hyperparameters. Defaults follow the reference code's GPT-2 XL settings
    (`hparams/ROME/gpt2-xl.json`), except where noted.

    layer: the MLP to edit; None = the model's preset, else a depth heuristic (with a warning).
        ROME picks the causal-tracing peak of MLP indirect effect at the last subject token
        (GPT-2 XL: layer 17, 0-indexed; GPT-J: 5).
    prefixes: (length in tokens, count) of random prefixes sampled from the model, each followed
        by ". " and the prompt; the plain prompt is always added. k* and v* use the same set.
        Code at its current head: [[5, 10], [10, 10]] = 21 contexts (`context_template_length_params`
        in `hparams/ROME/gpt2-xl.json`), halved for memory on 2022-04-07 from ((5, 20), (10, 20))
        = 41, which the default here keeps (an exception to the code's settings); an older
        `compute_u` used 50 prefixes of 2–10 tokens for k* only. The paper averages k* over
        "a small set" of random prefixes (its Eq. 3) and optimises v* over prefixed prompts (Eq. 4).
    prefix_top_k: prefixes are sampled top-k from the start token (code: generate_fast, top 5).
    seed: seeds the prefix sampler (a fresh torch.Generator per call; no global cache).
    v_num_grad_steps, v_lr: Adam steps and learning rate for δ (code: 20, 0.5).
    v_weight_decay: the term λ·‖δ‖ / ‖v_init‖² (code: 0.5; note ‖δ‖, not ‖δ‖²).
    clamp_norm_factor: after each step ‖δ‖ is clamped to this × ‖v_init‖ (code: 4).
    kl_factor: weight of KL(P_edited ‖ P_orig) on `kl_prompt` (code: 0.0625).
    kl_position: where the KL is read. The code reads the distribution at the subject's last
        token of "{subject} is a" ("subject_last", the default here); the paper's Eq. 4 reads the
        prompt's next-token distribution ("last").
    early_stop_loss: stop once the total loss falls below this (code: 0.05).
    mom2_adjustment: use C⁻¹k* (True, ROME) or k* itself (False: no statistics needed).
    mom2_corpus, mom2_n_tokens: what `rome_statistics` collects C over (code: 100,000 Wikipedia
        documents; here ordinary text, sized for a 2-core machine; see `SecondMoment.convergence`).
    layer_source: how the preset's layer was chosen.

    One deliberate difference from the code: the code's right vector divides by the key of the
    plain prompt and subtracts the plain prompt's MLP output, while u uses the prefix-averaged
    k*; here, as in the paper, the averaged k* is used throughout, so the update maps k* to v*.
    update_key: which key the update's denominator (and the subtracted MLP output) uses.
        "averaged" (default): the prefix-averaged k*, the same key as in u = C⁻¹k* (the paper;
        r-ROME, Gupta et al. 2024, "Rebuilding ROME", whose fix for collapse in sequential editing
        is exactly this homogeneity). "prompt": the plain prompt's key k_p, as the reference code
        does (`compute_v`: `right_vector = (target - cur_output) / dot(cur_input, left_vector)`
        with cur_input, cur_output read on the un-prefixed prompt), i.e. Λ = δ / ((C⁻¹k*)ᵀk_p):
        the update then maps k_p (not k*) to its old value + δ. Kept to reproduce ROME's
        sequential-editing collapse (`kvmem.stress_edits`); the Edit's k_star/v_star are then
        k_p and k_pᵀW_out + b_out + δ, the pair the update inserts exactly.
    """

    layer: int | None = None
    prefixes: tuple[tuple[int, int], ...] = ((5, 20), (10, 20))
    prefix_top_k: int = 5
    seed: int = 0
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    kl_position: Literal["subject_last", "last"] = "subject_last"
    early_stop_loss: float = 0.05
    mom2_adjustment: bool = True
    mom2_corpus: str = "wiki"
    mom2_n_tokens: int = config.STATS_TOKENS
    layer_source: str = "default"
    update_key: Literal["averaged", "prompt"] = "averaged"

    def __post_init__(self) -> None:
        if self.kl_prompt.count("{}") != 1:
            raise InvalidArgumentError("RomeHparams.kl_prompt needs exactly one '{}' for the subject.")
        if self.v_num_grad_steps < 1 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise InvalidArgumentError("Need v_num_grad_steps ≥ 1, v_lr > 0 and clamp_norm_factor > 0.")
        if any(length < 1 or count < 0 for length, count in self.prefixes):
            raise InvalidArgumentError("RomeHparams.prefixes holds (length ≥ 1, count ≥ 0) pairs.")
        if self.kl_position not in ("subject_last", "last"):
            raise InvalidArgumentError("kl_position must be 'subject_last' or 'last'.")
        if self.update_key not in ("averaged", "prompt"):
            raise InvalidArgumentError(
                "update_key must be 'averaged' (paper, r-ROME) or 'prompt' (ROME's reference code)."
            )

    @property
    def n_contexts(self) -> int:
        return 1 + sum(c for _, c in self.prefixes)

    @classmethod
    def from_dict(cls, d: dict) -> "RomeHparams":
        """The settings `dataclasses.asdict` wrote to JSON (an edit file, a saved session)."""
        d = dict(d)
        d["prefixes"] = tuple(tuple(p) for p in d["prefixes"])
        return cls(**d)


PRESETS: dict[str, RomeHparams] = {
    "gpt2-xl": RomeHparams(layer=17, layer_source="ROME code hparams/ROME/gpt2-xl.json (causal-tracing peak)"),
    "gpt-j-6b": RomeHparams(layer=5, layer_source="ROME code hparams/ROME/EleutherAI_gpt-j-6B.json"),
    # Fewer prefixes (11 contexts) keep an edit to seconds on a 2-core CPU. The norm clamp is 1, not
    # ROME's 4: with 4, v* always ends at the clamp and the edit spills onto neighbours (NS 47.5-50 vs
    # 68.5 unedited on 20 CounterFact records); with 1, NS 64.0, ES 100, PS 87.5 (layer 5,
    # benchmarks/results/editing/editing_neighbourhood_gemma-3-270m_clamp.md).
    "gemma-3-270m": RomeHparams(
        layer=4, prefixes=((5, 5), (10, 5)), clamp_norm_factor=1.0,
        layer_source="causal-tracing MLP peak at the last subject token (window-10 AIE over known facts, "
        "benchmarks/results/tracing/aie_gemma-3-270m.md); norm clamp 1 from the NS ablation at layer 5 "
        "(benchmarks/results/editing/editing_neighbourhood_gemma-3-270m_clamp.md)",
    ),
    # The fact world's facts are looked up by MLP 0 at the subject's last token (its training funnels
    # recall there); single-layer MLP tracing finds that layer (tests/test_editing_factworld.py).
    "factworld": RomeHparams(
        layer=0,
        layer_source="causal-tracing MLP peak at the last subject token (window 1); ROME there: ES/PS/NS "
        "100/100/100 vs 75/67/100 at layer 1 (benchmarks/results/editing/editing_factworld_layer{0,1}.md)",
    ),
    # Provisional: ROME's edit layers sit at 18% (GPT-J) to 35% (GPT-2 XL) of the depth; this takes ~30%.
    "smollm2-135m": RomeHparams(
        layer=8, prefixes=((5, 5), (10, 5)),
        layer_source="provisional: ~30% depth (ROME's relative depth); replace by the tracing peak",
    ),
}
_PRESET_ALIASES = {
    "gpt2-xl": "gpt2-xl", "gpt-j-6b": "gpt-j-6b", "eleutherai/gpt-j-6b": "gpt-j-6b",
    "gemma-3-270m": "gemma-3-270m", "google/gemma-3-270m": "gemma-3-270m", "gemma3-270m": "gemma-3-270m",
    "smollm2-135m": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "factworld": "factworld",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
}


def rome_hparams(model_or_name) -> RomeHparams:
    """The preset for a model (or model name); defaults with `layer=None` for unknown models."""
    name = model_or_name if isinstance(model_or_name, str) else getattr(model_or_name.cfg, "model_name", "")
    key = _PRESET_ALIASES.get(str(name).lower(), str(name).lower())
    return PRESETS.get(key, RomeHparams())


def edit_layer(model, hparams: RomeHparams, layer: int | None = None) -> int:
    """The layer an edit goes to: `layer`, else `hparams.layer`, else ~30% of the depth (warns)."""
    if layer is None:
        layer = hparams.layer
    if layer is None:
        layer = max(0, round(0.3 * (model.cfg.n_layers - 1)))
        warnings.warn(
            f"No ROME layer preset for {getattr(model.cfg, 'model_name', 'this model')!r}; editing layer "
            f"{layer} (~30% depth). Pass layer=... (the causal-tracing MLP peak) to choose.",
            stacklevel=3,
        )
    return check_layer(model, layer)


# --- the edit -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Edit:
    """A rank-one update ΔW_out = u Λᵀ of `blocks[layer].mlp.W_out`, and how it was found.

    `u` = C⁻¹k* / ‖C⁻¹k*‖; `lam` = Λ; `k_star`/`v_star` the key and value it inserts
    (k_starᵀ(W_out + ΔW_out) + b_out = v_star); `loss_trace` columns: loss, nll, kl,
    weight_decay, p_target (mean per-token probability of the new target), one row per step.
    """

    layer: int
    u: Float[Tensor, "d_mlp"] = field(repr=False)
    lam: Float[Tensor, "d_model"] = field(repr=False)
    k_star: Float[Tensor, "d_mlp"] = field(repr=False)
    v_star: Float[Tensor, "d_model"] = field(repr=False)
    request: Fact
    model_fingerprint: str
    hparams: RomeHparams = field(default_factory=RomeHparams)
    loss_trace: Float[Tensor, "step 5"] = field(default_factory=lambda: torch.zeros(0, 5), repr=False)
    seconds: float = float("nan")
    # the backend-independent fingerprint and the backend it was made on ("hooked"/"bridge"), so
    # that an edit saved on one TransformerLens applies to the same weights on the other
    # (`kvmem.core.fingerprint.same_weights`); None in edits saved before they were recorded
    weights_fingerprint: str | None = None
    backend: str | None = None

    TRACE_COLUMNS = ("loss", "nll", "kl", "weight_decay", "p_target")

    def delta(self, dtype: torch.dtype | None = None) -> Float[Tensor, "d_mlp d_model"]:
        """ΔW_out, [d_mlp, d_model] (computed in float64, returned in `dtype`)."""
        d = torch.outer(self.u.double(), self.lam.double())
        return d if dtype is None else d.to(dtype)

    def deltas(self, dtype: torch.dtype | None = None) -> list[tuple[int, Tensor]]:
        """[(layer, ΔW_out)]: the same interface as a multi-layer edit's."""
        return [(self.layer, self.delta(dtype))]

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    @property
    def describe(self) -> str:
        return f"ROME edit of subject {self.request.subject!r} at layer {self.layer}"

    def trace_frame(self):
        import pandas as pd

        return pd.DataFrame(self.loss_trace.tolist(), columns=list(self.TRACE_COLUMNS)).rename_axis("step")

    # -- files --
    def save(self, path: str | Path) -> Path:
        """Write the edit as safetensors (tensors + request, hparams, model fingerprint, checksum)."""
        tensors = {
            "u": self.u.contiguous(), "lam": self.lam.contiguous(), "k_star": self.k_star.contiguous(),
            "v_star": self.v_star.contiguous(), "loss_trace": self.loss_trace.contiguous(),
        }
        meta = {
            "format": "kvmem.rome_edit",
            "version": FORMAT_VERSION,
            "layer": str(self.layer),
            "model_fingerprint": self.model_fingerprint,
            "request": json.dumps(asdict(self.request)),
            "hparams": json.dumps(asdict(self.hparams)),
            "seconds": repr(self.seconds),
        }
        return write_edit_file(path, tensors, meta, weights_fingerprint=self.weights_fingerprint, backend=self.backend)

    @classmethod
    def load(cls, path: str | Path) -> "Edit":
        """Read an edit written by `save`; a damaged or foreign file raises `CacheError`."""
        meta, tensors = read_edit_file(path)
        if meta.get("format") != "kvmem.rome_edit":
            raise CacheError(f"Edit file {path} holds a {meta.get('format')!r}, not a ROME edit; use kvmem.load_edit.")
        hp = json.loads(meta["hparams"])
        return cls(
            layer=int(meta["layer"]),
            u=tensors["u"], lam=tensors["lam"], k_star=tensors["k_star"], v_star=tensors["v_star"],
            request=Fact(**json.loads(meta["request"])),
            model_fingerprint=meta["model_fingerprint"],
            hparams=RomeHparams.from_dict(hp),
            loss_trace=tensors["loss_trace"],
            seconds=float(meta["seconds"]),
            weights_fingerprint=meta.get("weights_fingerprint"),
            backend=meta.get("backend"),
        )


# --- k*: contexts ---------------------------------------------------------------------------

def context_prefixes(model, hparams: RomeHparams | None = None, *, seed: int | None = None) -> list[str]:
    """ROME's random context prefixes: "" (the plain prompt) plus model samples, each ending ". ".

    Sampled top-k from the model's start token with a fresh generator seeded by `seed`
    (default `hparams.seed`): same model and seed, same prefixes.
    """
    hparams = hparams or rome_hparams(model)
    spec = spec_for(model)
    gen = torch.Generator().manual_seed(hparams.seed if seed is None else seed)
    start = spec.sample_start_id
    start_ids = torch.tensor([start] if start is not None else encode(spec, "The", prepend_bos=False))
    out = [""]
    for length, count in hparams.prefixes:
        if count == 0:
            continue
        ids = sample_tokens(model, start_ids, count, length, hparams.prefix_top_k, gen)
        for row in ids.tolist():
            text = spec.tokenizer.decode(row, skip_special_tokens=True).replace("\n", " ").strip()
            out.append(text + ". " if text else "")
    return out


def _check_request(model, request) -> tuple[str, str]:
    if not isinstance(request, Fact):
        raise InvalidArgumentError(
            f"request must be a kvmem.Fact, got {type(request).__name__}; "
            "e.g. Fact('The Eiffel Tower is in', 'The Eiffel Tower', target_true='Paris', target_new='Rome')."
        )
    new = request.target("new")  # EmptyTargetError when missing
    if request.target_true is not None and request.target_true.strip() == new.strip():
        raise InvalidArgumentError(
            f"target_new {new!r} equals target_true: there is nothing to edit. Pass a different target_new."
        )
    subject_span(model, request.prompt, request.subject)  # subject must sit in the prompt, once
    return new, request.subject


def compute_rome_edit(
    model,
    request: Fact,
    *,
    layer: int | Literal["least-interference"] | None = None,
    stats: SecondMoment | Tensor | Mapping | Callable | None = None,
    hparams: RomeHparams | None = None,
    prefixes: Sequence[str] | None = None,
    null_space=None,
    verbose: bool = False,
    safe: bool | None = None,
    safe_facts: Sequence[Fact] | None = None,
    _fingerprint: str | None = None,
) -> Edit:
    """The ROME edit that makes `model` answer `request.target_new` for `request`. Does not
    change the model (apply it with `apply_edit` or `with edited(model, edit):`).

    `stats`: C for the edit layer (`second_moment(model, layer, corpus)`), or a [d_mlp, d_mlp]
    tensor; required unless `hparams.mom2_adjustment` is False. `hparams`: defaults to the
    model's preset (`rome_hparams(model)`); `layer` overrides its layer. `prefixes`: the context
    prefixes to use (default `context_prefixes(model, hparams)`; pass them to reuse across edits).
    `verbose`: print each v* optimisation step's loss (the same numbers as `Edit.loss_trace`).
    `safe`: None (default) = no interference check; False = predict the edit's interference
    (`kvmem.predict_interference` on `safe_facts`, facts the model answers, default kvmem's built-in
    facts) and warn (`InterferenceWarning`) when its risk exceeds the threshold; True = refuse such
    an edit (`UnsafeEditError`).
    `layer="least-interference"`: `kvmem.editing.interference.least_interference_edit` over the first
    half of the layers (`stats`: a mapping or callable layer → statistics; interference checked on
    `safe_facts`): the layer with the lowest predicted risk among those whose edit reaches the target.
    `null_space`: AlphaEdit's constraint (a `kvmem.editing.nullspace.NullSpace` or its P): the
    update becomes the smallest (Frobenius) one in range P that still maps k* to v*,
    u = Pk*/‖Pk*‖, so keys the statistics cover (‖Pk‖ ≈ 0) keep their output; C is then unused.
    """
    if layer == "least-interference":
        from kvmem.editing.interference import least_interference_edit

        if stats is None or isinstance(stats, (SecondMoment, Tensor)):
            raise InvalidArgumentError(
                "layer='least-interference' needs statistics for every candidate layer: "
                "stats={layer: second_moment(model, layer, corpus), ...} or a callable layer -> statistics.")
        choice = least_interference_edit(model, request, stats=stats, hparams=hparams, prefixes=prefixes,
                                         banks=("known",), known_facts=safe_facts)
        if safe is not None:
            from kvmem.editing.interference import warn_or_refuse

            warn_or_refuse(choice.predictions[choice.layers.index(choice.layer)], safe=bool(safe))
        return choice.edit
    t0 = time.perf_counter()
    hparams = hparams or rome_hparams(model)
    layer = edit_layer(model, hparams, layer)
    target_new, subject = _check_request(model, request)
    d_mlp = int(model.cfg.d_mlp)
    # `_fingerprint`: the caller's value instead of hashing every weight (~1 s for Gemma-3-270m);
    # sequential edits (kvmem.pipelines.stress) pass "" as their edits belong to no saved model
    if _fingerprint is None or isinstance(stats, SecondMoment):
        fp, weights_fp = fingerprints(model)
    else:
        fp, weights_fp = _fingerprint, None

    # statistics first: cheap checks before any forward pass
    if hparams.mom2_adjustment:
        if stats is None:
            raise InvalidArgumentError(
                "compute_rome_edit needs the key statistics of the edit layer: "
                f"stats=second_moment(model, {layer}, corpus) (or hparams.mom2_adjustment=False)."
            )
        _check_stats(stats, layer, fp, d_mlp)

    if prefixes is None:
        prefixes = context_prefixes(model, hparams)
    fit = fit_value(model, request, layer, hparams, prefixes, target_new=target_new, verbose=verbose)
    ctx_keys, k_star, delta, b_out, trace = fit.ctx_keys, fit.k_star, fit.delta, fit.b_out, fit.trace
    if hparams.update_key == "prompt":
        if "" not in prefixes:
            raise InvalidArgumentError(
                "update_key='prompt' needs the plain prompt among the contexts: include '' in prefixes."
            )
        k_update = ctx_keys[list(prefixes).index("")]
    else:
        k_update = k_star
    W = mlp_weights(model, layer)
    v_init = fit.v_init
    v_star = v_init + delta
    if hparams.update_key == "prompt":
        # the reference code's v* = (plain prompt's MLP output) + δ, so the update inserts (k_p, v_p + δ)
        v_star = k_update @ W.W_out.detach().double() + b_out + delta
    P = getattr(null_space, "P", null_space)
    u, lam = _rank_one(W.W_out.detach().double(), b_out, k_star, k_update, v_star,
                       stats if hparams.mom2_adjustment else None, P=P)
    edit = Edit(
        layer=layer,
        u=u.cpu(),
        lam=lam.cpu(),
        k_star=k_update.cpu(),
        v_star=v_star.cpu(),
        request=request,
        model_fingerprint=fp,
        hparams=replace(hparams, layer=layer),
        loss_trace=trace,
        seconds=time.perf_counter() - t0,
        weights_fingerprint=weights_fp,
        backend=backend_of(model),
    )
    if safe is not None:
        from kvmem.editing.interference import predict_interference, warn_or_refuse

        check = predict_interference(model, request, edit=edit, banks=("known",), known_facts=safe_facts,
                                     require_known=False)
        warn_or_refuse(check, safe=bool(safe))
    return edit


def _check_stats(stats, layer: int, fp: str, d_mlp: int) -> None:
    """Raise unless `stats` is an invertible C for this layer of this model."""
    checked_statistics(stats, layer, d_mlp, fingerprint=fp, invertible=True)


def _rank_one(W_out: Tensor, b_out: Tensor, k_star: Tensor, k_update: Tensor, v_star: Tensor,
              stats: SecondMoment | Tensor | None, P: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """u = C⁻¹k*/‖C⁻¹k*‖ (k* itself without statistics; Pk* with a null-space projection P) and Λ
    with k_updateᵀ(W_out + uΛᵀ) + b_out = v*."""
    if P is not None:
        if tuple(P.shape) != (k_star.shape[0], k_star.shape[0]):
            raise InvalidArgumentError(f"null_space P must be [{k_star.shape[0]}, {k_star.shape[0]}], got {tuple(P.shape)}.")
        u = P.double().to(k_star) @ k_star
        if u.norm() <= 1e-6 * k_star.norm():
            raise InvalidArgumentError("k* has no component in the null space (‖Pk*‖ ≈ 0): the constrained edit "
                                       "cannot insert it. Raise the null-space threshold or edit another layer.")
    elif stats is None:
        u = k_star.clone()
    elif isinstance(stats, SecondMoment):
        u = stats.solve(k_star)
    else:
        u = torch.linalg.solve(stats.double().to(k_star), k_star)
    u = u.to(k_star) / u.norm()
    denom = u @ k_update
    if not torch.isfinite(denom) or denom <= 0:
        raise InvalidArgumentError("(C⁻¹k*)ᵀk* is not positive: the statistics do not fit this layer's keys.")
    lam = (v_star - (k_update @ W_out + b_out)) / denom
    return u, lam


def reinsert(model, edit: Edit, stats: SecondMoment | Tensor | None = None, strength: float = 1.0) -> Edit:
    """The rank-one edit that inserts `edit`'s own k* → v* into `model` with other key statistics.

    k* and v* (the costly, optimised part of ROME) do not depend on C; only the update's direction
    u = C⁻¹k* does. This rebuilds u and Λ from `stats` (a `SecondMoment` of the edit's layer, a
    [d_mlp, d_mlp] tensor, or None for u = k*, i.e. no covariance adjustment), so the effect of the
    statistics on specificity can be measured without re-optimising v*. `strength` scales the
    inserted change: the update maps k* to v_old + strength·(v* − v_old) (1 = ROME). Does not
    change the model.
    """
    if edit.hparams.update_key != "averaged":
        raise InvalidArgumentError(
            "reinsert needs an edit made with update_key='averaged' (the paper's): an update_key='prompt' "
            "edit does not keep the averaged k* its u was built from."
        )
    if not (isinstance(strength, (int, float)) and strength == strength and strength > 0):
        raise InvalidArgumentError(f"strength must be a positive number, got {strength!r}.")
    same, why = same_weights(model, edit.model_fingerprint, edit.weights_fingerprint, made_on=edit.backend)
    if not same:
        raise ModelMismatchError(f"This edit was computed for different model weights: {why}.")
    if stats is not None:
        _check_stats(stats, edit.layer, edit.model_fingerprint, int(model.cfg.d_mlp))
    W = mlp_weights(model, edit.layer)
    W_out = W.W_out.detach().double().cpu()
    b_out = W.b_out.detach().double().cpu() if W.b_out is not None else torch.zeros(W_out.shape[1], dtype=torch.float64)
    k = edit.k_star.double().cpu()
    v_old = k @ W_out + b_out
    v_star = v_old + float(strength) * (edit.v_star.double().cpu() - v_old)
    u, lam = _rank_one(W_out, b_out, k, k, v_star, stats)
    return replace(edit, u=u, lam=lam, v_star=v_star,
                   hparams=replace(edit.hparams, mom2_adjustment=stats is not None))


def rome_statistics(model, hparams: RomeHparams | None = None, *, layer: int | None = None, **kwargs) -> SecondMoment:
    """`second_moment` for the preset's layer, corpus and token count (kwargs pass through)."""
    from kvmem.editing.stats import second_moment

    hparams = hparams or rome_hparams(model)
    layer = edit_layer(model, hparams, layer)
    kwargs.setdefault("n_tokens", hparams.mom2_n_tokens)
    return second_moment(model, layer, kwargs.pop("corpus", hparams.mom2_corpus), **kwargs)


__all__ = [
    "Edit", "RomeHparams", "PRESETS", "rome_hparams", "edit_layer", "compute_rome_edit",
    "context_prefixes", "rome_statistics", "reinsert",
]
