"""Fingerprints: which model (exact weights) a statistic or an edit belongs to, and file checksums.

Two fingerprints, both SHA-256 hex digests, recomputed on every call (about 0.6 s per GB of weights
here; nothing is memoised, so a fingerprint can never be stale). Changing any single weight changes
both.

- `weights_fingerprint(model)`: backend-independent. It hashes a canonical view of the weights
  that a HookedTransformer and a TransformerBridge in compatibility mode both expose, under
  HookedTransformer's names (`canonical_weights`): ``embed.W_E``, ``pos_embed.W_pos`` (learned
  positions only), ``unembed.W_U``/``b_U``, and per block the attention ``W_Q``/``W_K``/``W_V``/
  ``W_O``/``b_*`` (key/value heads as stored: grouped-query attention is not expanded), the MLP
  ``W_in``/``W_gate``/``W_out``/``b_in``/``b_out`` and the norm weights, each as the scale it
  multiplies by. A bias that is absent or all zeros and a norm that is absent (folded) or the
  identity are left out, which is how the two backends represent the same function. Plus the
  configuration fields both configurations share that define the function (`CANONICAL_CONFIG`),
  written in one form. The same weights give the same fingerprint on both backends; weights that
  differ in any bit give another.
- `model_fingerprint(model)`: what statistics, edits and run logs record. On a HookedTransformer
  it is what it always was (every parameter by its own name, plus its configuration), so the
  fingerprints already saved (edits, second-moment caches, run logs, the committed benchmark
  results) stay valid; on a TransformerBridge it is its `weights_fingerprint`.

`fingerprint_matches(model, recorded)` accepts either kind of record (`same_weights` says why not):
an edit made on a bridge (recording its weights fingerprint) applies to a HookedTransformer with the
same weights; an edit made on a HookedTransformer applies to a bridge when it also records its
`weights_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

import torch
from torch import Tensor

# Configuration fields that do not change the function a model computes.
_CFG_IGNORED = {"device", "n_devices", "seed", "model_name", "tokenizer_name", "checkpoint_index",
                "checkpoint_label_type", "checkpoint_value", "dtype", "use_hook_tokens",
                "use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in",
                "use_local_attn"}


def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def update_hash(h, tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Feed named tensors (name, shape, dtype, bytes) into a hashlib object."""
    for name, t in tensors:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            h.update(_tensor_bytes(t))


def tensors_checksum(tensors: dict[str, Tensor], extra: str = "") -> str:
    """SHA-256 over named tensors (sorted by name) and an extra string: a file's content checksum."""
    h = hashlib.sha256(extra.encode())
    update_hash(h, sorted(tensors.items()))
    return h.hexdigest()


def matrix_digest(C: Tensor) -> str:
    """20 hex digits of SHA-256 over C's float64 bytes: which statistics a run log or a saved edit
    session was made with (both have always written this value; keep it unchanged so they resume)."""
    return hashlib.sha256(C.detach().double().cpu().contiguous().numpy().tobytes()).hexdigest()[:20]


def _cfg_items(model) -> str:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return ""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    keep = {k: v for k, v in d.items() if k not in _CFG_IGNORED and isinstance(v, (int, float, str, bool, type(None)))}
    return json.dumps(keep, sort_keys=True, default=str)


def _backend(model) -> str | None:
    """"hooked" / "bridge" for a TransformerLens model, None for anything else (a plain module)."""
    from kvmem.core.backend import backend_of
    from kvmem.errors import InvalidArgumentError

    try:
        return backend_of(model)
    except InvalidArgumentError:
        if type(model).__name__ == "TransformerBridge":
            raise  # a bridge outside compatibility mode: say so
        return None


def _legacy_fingerprint(model) -> str:
    h = hashlib.sha256(_cfg_items(model).encode())
    update_hash(h, model.named_parameters())
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """SHA-256 hex digest of the model's weights and function-defining configuration: on a
    HookedTransformer (and any other module) every parameter under its own name plus the
    configuration, as kvmem has always recorded it; on a TransformerBridge its
    `weights_fingerprint` (the backend-independent one)."""
    if _backend(model) == "bridge":
        return weights_fingerprint(model)
    return _legacy_fingerprint(model)


def fingerprints(model) -> tuple[str, str]:
    """(`model_fingerprint`, `weights_fingerprint`), each hashed once (one hash on a bridge, where
    they are the same)."""
    weights = weights_fingerprint(model)
    return (weights if _backend(model) == "bridge" else _legacy_fingerprint(model)), weights


# --- the backend-independent view -------------------------------------------------------------------

#: Configuration fields that define the function and mean the same on both backends' configs.
CANONICAL_CONFIG = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out",
                    "n_key_value_heads", "act_fn", "normalization_type", "positional_embedding_type",
                    "gated_mlp", "eps")


def _canonical_config(cfg) -> dict:
    get = lambda k, default=None: getattr(cfg, k, default)  # noqa: E731
    norm = get("normalization_type")
    d_vocab_out = get("d_vocab_out")
    eps = get("eps")
    return {
        "n_layers": get("n_layers"), "d_model": get("d_model"), "n_heads": get("n_heads"),
        "d_head": get("d_head"), "d_mlp": get("d_mlp"), "d_vocab": get("d_vocab"),
        "d_vocab_out": d_vocab_out if d_vocab_out not in (None, -1) else get("d_vocab"),
        "n_key_value_heads": get("n_key_value_heads") or get("n_heads"),
        "act_fn": get("act_fn"),
        # "LNPre"/"RMSPre" is "LN"/"RMS" with its weights folded into the next layer
        "normalization_type": norm[:-3] if isinstance(norm, str) and norm.endswith("Pre") else norm,
        "positional_embedding_type": get("positional_embedding_type"),
        "gated_mlp": bool(get("gated_mlp", False)),
        # one config stores the float32 value of the other's float64 (1e-06 vs 9.99999997e-07)
        "eps": None if eps is None else float(torch.tensor(float(eps), dtype=torch.float32)),
    }


def _attr(obj, name: str):
    try:
        value = getattr(obj, name)
    except Exception:  # AttributeError, or a bridge property that refuses (W_pos on rotary models)
        return None
    return value if isinstance(value, Tensor) else None


def _first(obj, *names: str):
    for name in names:
        value = _attr(obj, name)
        if value is not None:
            return value
    return None


def _is_zero(t: Tensor) -> bool:
    return not bool(t.detach().ne(0).any())


def _norm_scale(module, offset: bool) -> Tensor | None:
    """The scale a norm multiplies by (Gemma's bridge stores ``w`` for ``1 + w``), None when the
    norm is absent, folded, or the identity."""
    if module is None:
        return None
    w = _attr(module, "w")
    if w is None:
        return None
    scale = w.detach() + 1 if offset else w.detach()
    return None if bool(scale.eq(1).all()) else scale


def _embedding(model, backend: str) -> Tensor | None:
    """W_E as the residual stream receives it. Gemma's Hugging Face embedding multiplies by
    ``embed_scale`` (sqrt(d_model)) in its forward, which the bridge wraps as it is, while
    HookedTransformer's conversion multiplies it into W_E (in the weights' dtype, as Hugging Face's
    forward does, so the products agree bit for bit)."""
    W_E = _attr(model, "W_E")
    if W_E is None or backend != "bridge":
        return W_E
    scale = getattr(getattr(getattr(model, "embed", None), "original_component", None), "embed_scale", None)
    if scale is None:
        return W_E
    scale = torch.as_tensor(scale).to(device=W_E.device, dtype=W_E.dtype)
    return W_E.detach() * scale


def canonical_weights(model) -> dict[str, Tensor]:
    """The model's weights under HookedTransformer's names, in its layout, as both backends expose
    them (see the module's docstring): the tensors `weights_fingerprint` hashes."""
    backend = _backend(model)
    if backend is None:
        raise TypeError(f"canonical_weights needs a HookedTransformer or TransformerBridge, "
                        f"got {type(model).__name__}.")
    cfg = model.cfg
    offset = backend == "bridge" and bool(getattr(cfg, "rmsnorm_uses_offset", False))
    out: dict[str, Tensor] = {}

    def put(name: str, t: Tensor | None, bias: bool = False) -> None:
        if t is None or (bias and _is_zero(t)):
            return
        out[name] = t.detach()

    def put_norm(name: str, module) -> None:
        scale = _norm_scale(module, offset)
        if scale is not None:
            out[f"{name}.w"] = scale
        bias = _attr(module, "b") if module is not None else None
        put(f"{name}.b", bias, bias=True)

    put("embed.W_E", _embedding(model, backend))
    if getattr(cfg, "positional_embedding_type", None) in ("standard", "shortformer"):
        put("pos_embed.W_pos", _attr(model, "W_pos"))
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if attn is not None:
            # HookedTransformer's grouped-query attention keeps the stored heads in _W_K/_W_V and
            # expands them in W_K/W_V; the bridge's W_K/W_V are the stored heads.
            put(f"blocks.{i}.attn.W_Q", _attr(attn, "W_Q"))
            put(f"blocks.{i}.attn.W_K", _first(attn, "_W_K", "W_K"))
            put(f"blocks.{i}.attn.W_V", _first(attn, "_W_V", "W_V"))
            put(f"blocks.{i}.attn.W_O", _attr(attn, "W_O"))
            put(f"blocks.{i}.attn.b_Q", _attr(attn, "b_Q"), bias=True)
            put(f"blocks.{i}.attn.b_K", _first(attn, "_b_K", "b_K"), bias=True)
            put(f"blocks.{i}.attn.b_V", _first(attn, "_b_V", "b_V"), bias=True)
            put(f"blocks.{i}.attn.b_O", _attr(attn, "b_O"), bias=True)
            put_norm(f"blocks.{i}.attn.q_norm", getattr(attn, "q_norm", None))
            put_norm(f"blocks.{i}.attn.k_norm", getattr(attn, "k_norm", None))
        mlp = getattr(block, "mlp", None)
        if mlp is not None:
            put(f"blocks.{i}.mlp.W_in", _attr(mlp, "W_in"))
            put(f"blocks.{i}.mlp.W_gate", _attr(mlp, "W_gate"))
            put(f"blocks.{i}.mlp.W_out", _attr(mlp, "W_out"))
            put(f"blocks.{i}.mlp.b_in", _attr(mlp, "b_in"), bias=True)
            put(f"blocks.{i}.mlp.b_out", _attr(mlp, "b_out"), bias=True)
        for norm in ("ln1", "ln2", "ln1_post", "ln2_post"):
            put_norm(f"blocks.{i}.{norm}", getattr(block, norm, None))
    put_norm("ln_final", getattr(model, "ln_final", None))
    put("unembed.W_U", _attr(model, "W_U"))
    put("unembed.b_U", _attr(model, "b_U"), bias=True)
    return out


def weights_fingerprint(model) -> str:
    """SHA-256 hex digest of `canonical_weights` and the shared configuration fields
    (`CANONICAL_CONFIG`): equal for the same weights on a HookedTransformer and a TransformerBridge."""
    h = hashlib.sha256(b"kvmem-weights/1|")
    h.update(json.dumps(_canonical_config(model.cfg), sort_keys=True, default=str).encode())
    update_hash(h, sorted(canonical_weights(model).items()))
    return h.hexdigest()


def same_weights(model, model_fp: str, weights_fp: str | None = None, *,
                 made_on: str | None = None) -> tuple[bool, str]:
    """(whether the model has the weights a record was made on, why not).

    `model_fp` is the recorded `model_fingerprint` (a HookedTransformer's own, or a bridge's weights
    fingerprint), `weights_fp` the recorded `weights_fingerprint` when the record has one,
    `made_on` the backend it was made on when known ("hooked"/"bridge"), for the reason."""
    if model_fp == model_fingerprint(model):
        return True, ""
    backend = _backend(model)
    now = weights_fingerprint(model)
    if now in {model_fp, weights_fp}:
        return True, ""
    here = {"hooked": "a HookedTransformer", "bridge": "a TransformerBridge"}.get(backend or "", "this model")
    if weights_fp is None and backend == "bridge" and made_on != "bridge":
        return False, (f"it records only a HookedTransformer fingerprint ({model_fp[:12]}…), which cannot "
                       f"be compared on {here}: recompute it on this model (or save it with a kvmem that "
                       "records the backend-independent weights fingerprint)")
    if made_on is not None and backend is not None and made_on != backend:
        return False, (f"it was made on {'a HookedTransformer' if made_on == 'hooked' else 'a TransformerBridge'} "
                       f"whose weights differ from {here}'s (weights fingerprint "
                       f"{(weights_fp or model_fp)[:12]}… vs {now[:12]}…): the two TransformerLens "
                       "versions processed the weights differently, or they are other weights")
    return False, (f"its weights differ from this model's (fingerprint {(weights_fp or model_fp)[:12]}… vs "
                   f"{now[:12]}…)")


def fingerprint_matches(model, model_fp: str, weights_fp: str | None = None) -> bool:
    """Whether a record's fingerprint(s) belong to this model's weights (`same_weights`)."""
    return same_weights(model, model_fp, weights_fp)[0]
