"""Fingerprints: which model (exact weights) a statistic or an edit belongs to, and file checksums.

A fingerprint is a SHA-256 over every parameter's name, shape, dtype and bytes, plus the
configuration fields that change what the weights compute. Changing any single weight changes it.
It is recomputed on every call (about 0.6 s per GB of weights here); nothing is memoised, so a
fingerprint can never be stale.
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


def _cfg_items(model) -> str:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return ""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    keep = {k: v for k, v in d.items() if k not in _CFG_IGNORED and isinstance(v, (int, float, str, bool, type(None)))}
    return json.dumps(keep, sort_keys=True, default=str)


def model_fingerprint(model) -> str:
    """SHA-256 hex digest of the model's weights and function-defining configuration."""
    h = hashlib.sha256(_cfg_items(model).encode())
    update_hash(h, model.named_parameters())
    return h.hexdigest()
