"""Sequential editing of one model: `EditSession.apply` MUTATES the model it was given.

    session = kvmem.EditSession(model, method="alphaedit", corpus="wiki")
    session.apply([fact1, fact2])      # writes both facts into the model's weights, now
    session.apply([fact3])             # computed on the model carrying the earlier edits
    session.save("run/")               # edits + the earlier edits' keys; EditSession.resume(model, "run/")
    session.restore()                  # every edited W_out back, bit-exactly; the session is empty again

method: "rome" (one rank-one edit per request, `compute_rome_edit`), "memit" (one multi-layer
edit per batch, `compute_memit_edit`), "alphaedit" (MEMIT with AlphaEdit's null-space projection
and the earlier edits' keys: each batch's update also leaves the outputs of the keys written before
in place, through Σ Kp Kpᵀ, which the session accumulates after every batch).

C (and P) always come from the model as it was when the session started (statistics of ordinary
text do not change because facts were edited; ROME's and AlphaEdit's code reuse them too). The
earlier edits' keys belong to one session object only: a new session starts with none, and
`restore()` clears them, saying so — runs meant to be independent never share them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from kvmem.core.facts import Fact
from kvmem.core.fingerprint import matrix_digest, model_fingerprint
from kvmem.core.weights import mlp_weights
from kvmem.editing.apply import _stack, apply_edit
from kvmem.editing.memit import MemitHparams, check_layers, compute_memit_edit, memit_hparams
from kvmem.editing.multi_edit import load_edit
from kvmem.editing.nullspace import null_space
from kvmem.editing.requests import request_key, screen_requests
from kvmem.editing.rome import RomeHparams, _check_request, compute_rome_edit, context_prefixes, rome_hparams
from kvmem.editing.stats import SecondMoment, checked_statistics
from kvmem.errors import AlreadySatisfiedError, InvalidArgumentError, ModelMismatchError

METHODS = ("rome", "memit", "alphaedit")
SESSION_FORMAT = "kvmem.edit_session"


@dataclass(frozen=True)
class SessionStep:
    """What one `apply` did: requests written, skipped ones with the reason, and the time spent
    (v* optimisation vs keys and solves, seconds)."""

    applied: tuple[int, ...]
    skipped: tuple[dict, ...]
    seconds_values: float
    seconds_solve: float
    seconds: float

    def __repr__(self) -> str:
        return (f"SessionStep(applied={len(self.applied)}, skipped={len(self.skipped)}, "
                f"seconds={self.seconds:.1f})")


class EditSession:
    """Edits applied one batch after another to `model`, which `apply` MUTATES (module docstring).

    `stats`: C per edit layer ({layer: SecondMoment or tensor}), else computed (and cached on disk)
    over `corpus` with `n_tokens` tokens (default `kvmem.pipelines.rome_settings.stats_tokens`).
    `layers`: override the preset's edit layers (rome: the first is used per request, or edits go
    round-robin over them). `hparams`: a `RomeHparams` (rome) or `MemitHparams` (memit/alphaedit).
    `skip_satisfied`: skip requests the model already answers (reported in each `SessionStep`).
    """

    def __init__(self, model, method: str = "alphaedit", *, stats: Mapping[int, SecondMoment | Tensor] | None = None,
                 corpus="wiki", n_tokens: int | None = None, layers: Sequence[int] | None = None,
                 hparams: RomeHparams | MemitHparams | None = None, skip_satisfied: bool = True,
                 progress: bool | None = None):
        if method not in METHODS:
            raise InvalidArgumentError(f"method must be one of {list(METHODS)}, got {method!r}.")
        self.model, self.method, self.skip_satisfied = model, method, skip_satisfied
        if method == "rome":
            hp = hparams or rome_hparams(model)
            if not isinstance(hp, RomeHparams):
                raise InvalidArgumentError("method='rome' takes RomeHparams.")
            layer_list = check_layers(model, [hp.layer] if layers is None and hp.layer is not None else layers)
            self.hparams = replace(hp, layer=layer_list[0], update_key="averaged")
            value = self.hparams
        else:
            hp = hparams or memit_hparams(model)
            if not isinstance(hp, MemitHparams):
                raise InvalidArgumentError(f"method={method!r} takes MemitHparams.")
            layer_list = check_layers(model, hp.layers if layers is None else layers)
            self.hparams = replace(hp, layers=layer_list, null_space=method == "alphaedit")
            value = replace(hp.value, layer=layer_list[-1])
        self.layers = layer_list
        self.fingerprint0 = model_fingerprint(model)
        self._C = self._statistics(stats, corpus, n_tokens, progress)
        self.null_spaces = ({l: null_space(self._C[l], threshold=self.hparams.nullspace_threshold,
                                           relative=self.hparams.nullspace_relative) for l in layer_list}
                            if method == "alphaedit" else {})
        self.prefixes = context_prefixes(model, value)
        self._originals = {l: mlp_weights(model, l).W_out.detach().clone() for l in layer_list}
        # apply_edit records each edit on the model (kvmem.editing.apply); restore() drops this
        # session's records again, as `edited` does on exit
        self._stack_depth = len(_stack(model))
        self._clear()

    # -- state --
    def _clear(self) -> None:
        d = int(self.model.cfg.d_mlp)
        self.edits: list = []
        self.steps: list[SessionStep] = []
        self._written: dict[tuple[str, str], str] = {}
        # AlphaEdit's Σ Kp Kpᵀ over the keys written so far, per layer; only this object holds it
        self.prev_keys: dict[int, Tensor] = ({l: torch.zeros(d, d, dtype=torch.float64) for l in self.layers}
                                             if self.method == "alphaedit" else {})

    def _statistics(self, stats, corpus, n_tokens, progress) -> dict[int, Tensor]:
        from kvmem.editing.stats import second_moment
        from kvmem.pipelines.rome_settings import stats_tokens

        d = int(self.model.cfg.d_mlp)
        out = {}
        for l in self.layers:
            s = stats.get(l) if stats is not None else None
            if s is None:
                if stats is not None:
                    raise InvalidArgumentError(f"stats has no C for edit layer {l}; give one per layer in {list(self.layers)}.")
                s = second_moment(self.model, l, corpus, n_tokens=n_tokens or stats_tokens(self.model), progress=progress)
            out[l] = checked_statistics(s, l, d, fingerprint=self.fingerprint0, invertible=self.method != "alphaedit")
        return out

    @property
    def n_edits(self) -> int:
        """Requests written so far."""
        return len(self._written)

    def __repr__(self) -> str:
        kp = (f", keys of {self.n_edits} earlier edit(s) held" if self.method == "alphaedit"
              else "")
        return f"EditSession({self.method}, layers {list(self.layers)}, {self.n_edits} edit(s) applied{kp})"

    # -- editing --
    def apply(self, requests: Fact | Sequence[Fact]) -> SessionStep:
        """MUTATES the model: writes `requests` (one Fact or a batch) into its weights at once.
        Conflicts (with each other or with an earlier edit of this session) raise
        `DuplicateRequestError`; duplicates and requests the model already answers are skipped and
        reported in the returned `SessionStep`."""
        t0 = time.perf_counter()
        if isinstance(requests, Fact):
            requests = [requests]
        requests = list(requests)
        if not requests:
            raise InvalidArgumentError("Empty batch: pass one or more kvmem.Facts with target_new.")
        if model_fingerprint(self.model) != self._fingerprint_now():
            raise ModelMismatchError("The model's weights changed outside this session since its last apply; "
                                     "restore() or start a new session on the model as it is.")
        keep, skipped = screen_requests(requests, earlier=self._written)
        for i in keep:  # bad input fails here, before any request of the batch is written
            _check_request(self.model, requests[i])
        applied, t_values = [], 0.0
        if self.method == "rome":
            try:
                for i in keep:
                    layer = self.layers[len(self.edits) % len(self.layers)]
                    try:
                        e = compute_rome_edit(self.model, requests[i], layer=layer, stats=self._C[layer],
                                              hparams=self.hparams, prefixes=self.prefixes, _fingerprint="")
                    except AlreadySatisfiedError as err:
                        if not self.skip_satisfied:
                            raise
                        skipped.append({"index": i, "subject": requests[i].subject,
                                        "skipped": f"already satisfied: {err}"})
                        continue
                    apply_edit(self.model, e, check=False)
                    self.edits.append(e)
                    applied.append(i)
                    t_values += float(e.seconds)
            finally:
                # a request failing mid-batch leaves the earlier ones written: record them, so
                # that the session still knows its model (and the next apply is not refused)
                self._record(requests, applied)
        elif keep:
            sub = [requests[i] for i in keep]
            try:
                e = compute_memit_edit(self.model, sub, stats=self._C, hparams=self.hparams,
                                       null_spaces=self.null_spaces or None, prev_keys=self.prev_keys or None,
                                       prefixes=self.prefixes, skip_satisfied=self.skip_satisfied, _fingerprint="")
            except InvalidArgumentError as err:
                if not str(err).startswith("Nothing to edit"):
                    raise
                skipped += [{"index": i, "subject": requests[i].subject, "skipped": str(err)} for i in keep]
                e = None
            if e is not None:
                apply_edit(self.model, e, check=False)
                self.edits.append(e)
                done = {id(r) for r in e.requests}
                applied = [i for i in keep if id(requests[i]) in done]
                skipped += [{**s, "index": keep[s["index"]]} for s in e.skipped]
                t_values = e.seconds["values"]
                for j, l in enumerate(e.layers):
                    if e.keys_after:
                        ka = e.keys_after[j].double()
                        self.prev_keys[l] += ka.T @ ka
            self._record(requests, applied)
        total = time.perf_counter() - t0
        step = SessionStep(tuple(applied), tuple(sorted(skipped, key=lambda s: s["index"])), t_values,
                           total - t_values, total)
        self.steps.append(step)
        return step

    def _record(self, requests: Sequence[Fact], applied: Sequence[int]) -> None:
        """Remember what `apply` wrote and the fingerprint of the model carrying it."""
        for i in applied:
            self._written[request_key(requests[i])] = requests[i].target_new
        self._fp_after = model_fingerprint(self.model)

    def _fingerprint_now(self) -> str:
        return getattr(self, "_fp_after", None) if self.edits else self.fingerprint0

    def restore(self) -> str:
        """MUTATES the model back: every W_out this session edited becomes bit-exactly what it was
        when the session started; the session's edits and earlier-edit keys are dropped. Returns
        (and says) what was reset."""
        with torch.no_grad():
            for l, W0 in self._originals.items():
                mlp_weights(self.model, l).W_out.copy_(W0)
        del _stack(self.model)[self._stack_depth:]
        n = self.n_edits
        self._clear()
        self._fp_after = None
        msg = (f"EditSession reset: {n} edit(s) undone, W_out of layers {list(self.layers)} restored bit-exactly"
               + ("; the earlier edits' keys (Σ Kp Kpᵀ) cleared" if self.method == "alphaedit" else "") + ".")
        print(msg)
        return msg

    # -- files --
    def save(self, path: str | Path) -> Path:
        """Write the session to folder `path`: session.json, one file per edit, the earlier edits' keys."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for i, e in enumerate(self.edits):
            e.save(path / f"edit_{i:05d}.safetensors")
        if self.prev_keys:
            save_file({str(l): t.contiguous() for l, t in self.prev_keys.items()}, str(path / "prev_keys.safetensors"))
        meta = {"format": SESSION_FORMAT, "method": self.method, "layers": list(self.layers),
                "hparams": asdict(self.hparams), "fingerprint0": self.fingerprint0, "n_edit_files": len(self.edits),
                "written": [[k[0], k[1], v] for k, v in self._written.items()], "prefixes": self.prefixes,
                "stats": {str(l): matrix_digest(C) for l, C in self._C.items()}}
        (path / "session.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def resume(cls, model, path: str | Path, *, stats: Mapping[int, SecondMoment | Tensor] | None = None,
               corpus="wiki", n_tokens: int | None = None) -> "EditSession":
        """A session saved with `save`, continued on `model` as it was before the session (the
        saved edits are re-applied, bit-exactly the same weights; MUTATES the model)."""
        from safetensors.torch import load_file

        path = Path(path)
        try:
            meta = json.loads((path / "session.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidArgumentError(f"No readable session at {path} ({type(e).__name__}).") from None
        if meta.get("format") != SESSION_FORMAT:
            raise InvalidArgumentError(f"{path} holds no kvmem edit session.")
        if model_fingerprint(model) != meta["fingerprint0"]:
            raise ModelMismatchError("resume needs the model as it was when the session started (fingerprint mismatch).")
        hp = (RomeHparams.from_dict(meta["hparams"]) if meta["method"] == "rome"
              else MemitHparams.from_dict(meta["hparams"]))
        s = cls(model, meta["method"], stats=stats, corpus=corpus, n_tokens=n_tokens, layers=meta["layers"], hparams=hp)
        if {str(l): matrix_digest(C) for l, C in s._C.items()} != meta["stats"]:
            raise ModelMismatchError("The statistics differ from the saved session's; pass the same stats (or corpus).")
        s.prefixes = list(meta["prefixes"])
        for i in range(meta["n_edit_files"]):
            e = load_edit(path / f"edit_{i:05d}.safetensors")
            apply_edit(model, e, check=False)
            s.edits.append(e)
        if s.method == "alphaedit":
            s.prev_keys = {int(k): v for k, v in load_file(str(path / "prev_keys.safetensors")).items()}
        s._written = {(a, b): v for a, b, v in meta["written"]}
        s._fp_after = model_fingerprint(model)
        return s


__all__ = ["EditSession", "SessionStep", "METHODS"]
