"""An edit of several MLPs at once (MEMIT, AlphaEdit): per layer l a low-rank update
ΔW_out(l) = U_l V_l with U_l [d_mlp, n] and V_l [n, d_model], n the number of requests.

It applies, restores and checks fingerprints exactly as a ROME `Edit` does (`kvmem.apply_edit`,
`with kvmem.edited(model, edit):`), and saves to / loads from safetensors with a checksum;
`load_edit(path)` reads either kind (ROME edits saved before this type existed load as `Edit`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem.core.facts import Fact
from kvmem.editing.edit_file import read_edit_file, write_edit_file
from kvmem.errors import CacheError

FORMAT = "kvmem.multi_layer_edit"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class MultiLayerEdit:
    """ΔW_out(layers[i]) = U[i] @ V[i] for each edited layer, and how it was found.

    `keys[i]`: the requests' keys at `layers[i]` (rows; averaged over the context prefixes) when
    that layer's update was solved; `keys_after[i]`: the same keys once every layer is updated
    (AlphaEdit adds their outer products to the earlier-edit statistics Kp Kpᵀ; empty for MEMIT);
    `targets`: z, the residual stream after the last layer that v* asks for (rows); `residual`:
    mean ‖z − h‖ / mean ‖z − h⁰‖ before and after the update (how much of the change the update
    delivers at the subject's last token of the plain prompts); `skipped`: requests left out and why;
    `seconds`: {"values": v* optimisation, "solve": keys + solves, "total"}."""

    layers: tuple[int, ...]
    U: tuple[Tensor, ...] = field(repr=False)
    V: tuple[Tensor, ...] = field(repr=False)
    keys: tuple[Tensor, ...] = field(repr=False)
    targets: Float[Tensor, "n d_model"] = field(repr=False)
    requests: tuple[Fact, ...] = field(repr=False)
    method: str
    model_fingerprint: str
    hparams: Any = field(default=None, repr=False)
    keys_after: tuple[Tensor, ...] = field(default=(), repr=False)
    skipped: tuple[dict, ...] = ()
    residual: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    weights_fingerprint: str | None = None
    backend: str | None = None

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    @property
    def describe(self) -> str:
        return f"{self.method} edit of {self.n_requests} request(s) at layers {list(self.layers)}"

    def delta(self, i: int, dtype: torch.dtype | None = None) -> Float[Tensor, "d_mlp d_model"]:
        """ΔW_out of `layers[i]` (float64, returned in `dtype`)."""
        d = self.U[i].double() @ self.V[i].double()
        return d if dtype is None else d.to(dtype)

    def deltas(self, dtype: torch.dtype | None = None) -> list[tuple[int, Tensor]]:
        """[(layer, ΔW_out)] in the order the updates were solved."""
        return [(l, self.delta(i, dtype)) for i, l in enumerate(self.layers)]

    def to_frame(self):
        """One row per layer: rank, ‖ΔW‖_F."""
        import pandas as pd

        return pd.DataFrame([{"layer": l, "rank": int(self.U[i].shape[1]), "update_norm": float(self.delta(i).norm())}
                             for i, l in enumerate(self.layers)])

    def save(self, path: str | Path) -> Path:
        """Write the edit as safetensors (tensors + requests, hparams, fingerprints, checksum)."""
        tensors = {"targets": _dense(self.targets)}
        for i in range(len(self.layers)):
            tensors[f"U{i}"] = _dense(self.U[i])
            tensors[f"V{i}"] = _dense(self.V[i])
            tensors[f"K{i}"] = _dense(self.keys[i])
        for i, k in enumerate(self.keys_after):
            tensors[f"KA{i}"] = _dense(k)
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "method": self.method,
            "layers": json.dumps(list(self.layers)), "model_fingerprint": self.model_fingerprint,
            "requests": json.dumps([asdict(r) for r in self.requests]),
            "hparams": json.dumps(asdict(self.hparams) if self.hparams is not None else None),
            "skipped": json.dumps(list(self.skipped)), "residual": json.dumps(self.residual),
            "seconds": json.dumps(self.seconds),
        }
        return write_edit_file(path, tensors, meta, weights_fingerprint=self.weights_fingerprint, backend=self.backend)

    @classmethod
    def load(cls, path: str | Path) -> "MultiLayerEdit":
        """Read an edit written by `save`; a damaged or foreign file raises `CacheError`."""
        meta, tensors = read_edit_file(path)
        if meta.get("format") != FORMAT:
            raise CacheError(f"{path} holds a {meta.get('format')!r}, not a multi-layer edit; use kvmem.load_edit.")
        from kvmem.editing.memit import MemitHparams

        layers = tuple(json.loads(meta["layers"]))
        n = len(layers)
        hp = json.loads(meta["hparams"])
        return cls(
            layers=layers, U=tuple(tensors[f"U{i}"] for i in range(n)), V=tuple(tensors[f"V{i}"] for i in range(n)),
            keys=tuple(tensors[f"K{i}"] for i in range(n)), targets=tensors["targets"],
            requests=tuple(Fact(**r) for r in json.loads(meta["requests"])), method=meta["method"],
            model_fingerprint=meta["model_fingerprint"],
            hparams=MemitHparams.from_dict(hp) if hp is not None else None,
            keys_after=tuple(tensors[f"KA{i}"] for i in range(n) if f"KA{i}" in tensors),
            skipped=tuple(json.loads(meta["skipped"])), residual=json.loads(meta["residual"]),
            seconds=json.loads(meta["seconds"]), weights_fingerprint=meta.get("weights_fingerprint"),
            backend=meta.get("backend"),
        )


def _dense(t: Tensor) -> Tensor:
    """float64 with row-major strides even along size-1 dimensions (which `.contiguous()` may keep odd)."""
    return t.detach().double().cpu().reshape(-1).clone().reshape(t.shape)


def load_edit(path: str | Path):
    """Read any kvmem edit file: a ROME `Edit` (also those saved before multi-layer edits existed)
    or a `MultiLayerEdit`."""
    meta, _ = read_edit_file(path)
    if meta.get("format") == FORMAT:
        return MultiLayerEdit.load(path)
    from kvmem.editing.rome import Edit

    return Edit.load(path)


__all__ = ["MultiLayerEdit", "load_edit"]
