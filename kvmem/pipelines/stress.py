"""Sequential-edit stress tests: many ROME edits one after another, and where the model breaks.

    result = kvmem.stress_edits(model, requests, stats={5: C5}, method="rome", every=10,
                                neighbours=untouched, known=known_facts, log="run.jsonl")
    result.to_frame(); result.plot(); result.collapse_step

Each request is a `Fact` with `target_new`. Edit i is computed on the model carrying edits
0..i-1 and applied at once (`apply_edit`), as in sequential ROME (Gupta et al. 2024). Every
`every` edits (and after the last one) the run measures, on the edited model:

- `retention`: share of the edits applied so far whose prompt now answers `target_new`
  (top-1 first token), i.e. whether earlier edits survive later ones;
- `efficacy_last`: the same for the edits applied since the previous checkpoint;
- `neighborhood_acc` / `known_acc`: top-1 accuracy (first token of `target_true`) on the
  untouched facts passed as `neighbours` and `known` (the metric keeps CounterFact's name);
- `gen_entropy`: ROME's generation entropy (`kvmem.evaluation.ngram_entropy`, mean over
  `gen_prompts`, one seeded top-5 sample of `gen_tokens` tokens each);
- `w_norm_growth[l]` = ‖W_out(l)‖_F / ‖W_out⁰(l)‖_F and `w_delta_rel[l]` = ‖W_out(l) − W_out⁰(l)‖_F /
  ‖W_out⁰(l)‖_F for every layer edited so far, plus each edit's own ‖ΔW‖_F = ‖Λ‖ (u has unit norm).

Collapse: the first checkpoint where `known_acc` (else `neighborhood_acc`) falls below
`collapse_frac` × its value on the unedited model, or `gen_entropy` falls below
`collapse_frac` × its unedited value (repetitive text, ROME's "disabling edit" symptom).

Methods: "rome" = ROME as its reference code computes the update (`RomeHparams.update_key="prompt"`:
the denominator uses the plain prompt's key while u = C⁻¹k* uses the prefix-averaged key);
"r-rome" = the same prefix-averaged key in both (`update_key="averaged"`, kvmem's default,
the fix of "Rebuilding ROME"). `layers` as a list spreads edits round-robin over those layers.
"memit" / "alphaedit": batches of `edit_batch` requests, each one `compute_memit_edit` over all
of `layers` (AlphaEdit: with the null-space projection of each layer's C and the keys of every
earlier batch, Σ Kp Kpᵀ, accumulated through the run as AlphaEdit's code does).

C is the statistics of the ORIGINAL model for each edit layer (ROME's code caches it once and
reuses it across sequential edits): a `SecondMoment` is checked against the model once, at the
start, then passed on as a plain tensor, so the fingerprint check of `compute_rome_edit` (which
would reject the edited model) does not apply.

Seeded and resumable: with `log=path` every edit (its u and Λ in exact float64) and every
checkpoint is appended to a run log (`kvmem.runs.RunLog`) as it happens; rerunning with the same
arguments replays the logged edits (bit-exactly the same weights) and continues where the log
stops. A log written by a different model, request list or setting raises `RunLogError`. The model's
weights are restored bit-exactly at the end (also on an exception) unless `restore=False`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvmem import config
from kvmem.editing.apply import apply_edit
from kvmem.core.fingerprint import matrix_digest, model_fingerprint
from kvmem.editing.memit import MemitHparams, compute_memit_edit, memit_hparams
from kvmem.editing.nullspace import null_space
from kvmem.editing.requests import find_repeats, request_key
from kvmem.editing.rome import Edit, RomeHparams, compute_rome_edit, context_prefixes, rome_hparams
from kvmem.editing.stats import SecondMoment, checked_statistics
from kvmem.errors import DuplicateRequestError, InvalidArgumentError, KvmemError
from kvmem.evaluation import generate_texts, ngram_entropy
from kvmem.core.facts import Fact
from kvmem.recall import fact_recall
from kvmem.core.weights import check_layer, mlp_weights
from kvmem.runs import RunLog, write_run_log

METHODS = {"rome": "prompt", "r-rome": "averaged", "memit": None, "alphaedit": None}
BATCHED = ("memit", "alphaedit")  # one multi-layer edit per batch of `edit_batch` requests
LOG_VERSION = 1


# --------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class StressResult:
    """One sequential-editing run: a row per checkpoint (`checkpoints`), a row per request
    (`steps`: layer, ‖ΔW‖, seconds, or the reason it was skipped), and the collapse point.

    `collapse_step` is the number of edits applied when collapse was first seen (None if never);
    `baseline` holds the metrics of the unedited model (step 0 is also the first checkpoint).
    """

    method: str
    layers: tuple[int, ...]
    checkpoints: tuple[dict, ...]
    steps: tuple[dict, ...]
    baseline: dict
    collapse_step: int | None
    collapse_reason: str | None
    n_applied: int
    n_skipped: int
    seconds: float
    log_path: str | None = None
    resumed_from: int = 0
    config: dict = field(default_factory=dict, compare=False)

    def to_frame(self):
        """One row per checkpoint: step (edits applied), metrics, W_out norm growth per layer."""
        import pandas as pd

        rows = []
        for c in self.checkpoints:
            r = {k: v for k, v in c.items() if not isinstance(v, dict)}
            for name in ("w_norm_growth", "w_delta_rel"):
                for l, v in c.get(name, {}).items():
                    r[f"{name}_L{l}"] = v
            rows.append(r)
        return pd.DataFrame(rows)

    def steps_frame(self):
        """One row per request: index, subject, layer, update norm ‖ΔW‖_F, seconds, skipped reason."""
        import pandas as pd

        return pd.DataFrame(list(self.steps))

    def plot(self, ax=None, *, title: str | None = None):
        """Four panels against the number of edits: retention and accuracies, generation entropy,
        relative W_out change per layer, and each edit's ‖ΔW‖ (collapse marked). `ax`: four axes
        to draw into (default: a new figure). Returns the Figure."""
        from kvmem.viz import figure_axes

        fig, axes = figure_axes(ax, 4, figsize=(17, 3.4))
        df = self.to_frame()
        ax = axes[0]
        for col, label in (("retention", "retention of earlier edits"), ("neighborhood_acc", "neighbourhood acc."),
                           ("known_acc", "known-fact acc.")):
            if col in df and df[col].notna().any():
                ax.plot(df["step"], df[col], label=label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("edits applied")
        ax.legend(fontsize=7)
        ax = axes[1]
        if "gen_entropy" in df and df["gen_entropy"].notna().any():
            ax.plot(df["step"], df["gen_entropy"], color="C3")
        ax.set_title("generation entropy", fontsize=9)
        ax.set_xlabel("edits applied")
        ax = axes[2]
        for col in [c for c in df.columns if c.startswith("w_delta_rel_L")]:
            ax.plot(df["step"], df[col], label=col.replace("w_delta_rel_", ""))
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title("‖W_out − W_out⁰‖ / ‖W_out⁰‖", fontsize=9)
        ax.set_xlabel("edits applied")
        ax.legend(fontsize=7)
        ax = axes[3]
        st = self.steps_frame()
        if len(st) and "update_norm" in st:
            ok = st[st["update_norm"].notna()]
            ax.semilogy(ok["step"], ok["update_norm"], ".", markersize=3)
        ax.set_title("‖ΔW‖ of each edit", fontsize=9)
        ax.set_xlabel("edit")
        if self.collapse_step is not None:
            for a in axes:
                a.axvline(self.collapse_step, color="k", linestyle=":", linewidth=1)
        fig.suptitle(title or f"{self.method} on layers {list(self.layers)}: {self.n_applied} edits"
                     + (f", collapse at {self.collapse_step}" if self.collapse_step is not None else ", no collapse"),
                     fontsize=10)
        fig.tight_layout()
        return fig


# --------------------------------------------------------------------------------------------
# Requests


def check_requests(requests: Sequence[Fact], *, on_conflict: str = "raise") -> tuple[list[int], list[dict]]:
    """Indices of the requests to edit, and the skipped ones with their reason.

    Two requests are the same fact when subject and relation (or, without `relation_id`, subject
    and prompt) agree (`kvmem.editing.requests.find_repeats`). A repeat with the same `target_new`
    is a duplicate, one with a different `target_new` a conflict (the later edit would silently
    overwrite the earlier one). With `on_conflict="raise"` either raises `DuplicateRequestError`;
    with "skip" the first request is kept and the later ones are reported as skipped.
    """
    if on_conflict not in ("raise", "skip"):
        raise InvalidArgumentError(f"on_conflict must be 'raise' or 'skip', got {on_conflict!r}.")
    keep, repeats = find_repeats(requests)
    skipped, problems = [], []
    for r in repeats:
        f, j = requests[r.index], r.first
        why = (f"duplicate of request {j}" if r.same else
               f"conflicts with request {j} ({requests[j].target_new!r} vs {f.target_new!r})")
        problems.append(f"request {r.index} ({f.subject!r}, {request_key(f)[1]!r}) {why}")
        skipped.append({"index": r.index, "subject": f.subject, "skipped": why})
    if problems and on_conflict == "raise":
        raise DuplicateRequestError(
            f"{len(problems)} request(s) edit a fact that an earlier request already edits: "
            + "; ".join(problems[:5]) + ("; …" if len(problems) > 5 else "")
            + ". Remove them, or pass on_conflict='skip' to keep the first of each."
        )
    return keep, skipped


# --------------------------------------------------------------------------------------------
# Log


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.detach().cpu().double().contiguous().numpy().tobytes()).decode()


def _unb64(s: str) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.float64).copy())


def _requests_hash(requests: Sequence[Fact]) -> str:
    h = hashlib.sha256()
    for f in requests:
        h.update(json.dumps(asdict(f), sort_keys=True).encode())
    return h.hexdigest()


def _read_v1_log(path: Path) -> list[dict] | None:
    """The complete lines of a stress log in its first format (a `{"kind": "header"}` line, then
    step and checkpoint lines), or None when the file is not one. A line cut off by an
    interruption, and anything after it, is dropped."""
    with path.open("rb") as fh:
        first = fh.readline()
    try:
        header = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or header.get("kind") != "header":
        return None
    out = []
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def _upgrade_v1_log(path: Path) -> None:
    """Rewrite a first-format stress log (from before stress runs used `RunLog`) as a `RunLog`
    holding the same run: settings = its config; records "prefixes", "step-<n>" and "checkpoint-<n>"."""
    lines = _read_v1_log(path)
    if lines is None:
        return
    header, records = lines[0], {"prefixes": {"prefixes": lines[0]["prefixes"]}}
    for r in lines[1:]:
        if r.get("kind") in ("step", "checkpoint"):
            records[f"{r['kind']}-{r['step']}"] = r
    write_run_log(path, header["config"], records)


def _open_log(log: str | Path, settings: dict, restart: bool) -> RunLog:
    path = Path(log)
    if not restart and path.exists() and path.stat().st_size > 0:
        _upgrade_v1_log(path)
    return RunLog(path, settings, restart=restart)


# --------------------------------------------------------------------------------------------
# Measurements


def _accuracy(model, facts: Sequence[Fact], target: str, batch_size: int) -> float:
    if not facts:
        return float("nan")
    return fact_recall(model, facts, batch_size=batch_size, target=target, progress=False).top_k(1)


def _entropy(model, prompts: Sequence[str], tokens: int, seed: int) -> float:
    if not prompts or tokens < 1:
        return float("nan")
    texts = generate_texts(model, list(prompts), max_new_tokens=tokens, seed=seed)
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def _norms(model, originals: Mapping[int, Tensor], touched: set[int]) -> tuple[dict, dict]:
    growth, delta = {}, {}
    for l in sorted(touched):
        W = mlp_weights(model, l).W_out.detach().double()
        W0 = originals[l].double()
        n0 = float(W0.norm())
        growth[str(l)] = float(W.norm()) / n0
        delta[str(l)] = float((W - W0).norm()) / n0
    return growth, delta


# --------------------------------------------------------------------------------------------
# The run


def _stats_for(stats, layer: int, d_mlp: int, *, fingerprint: str, invertible: bool) -> Tensor | None:
    """C of one edit layer from `stats` (one C, {layer: C} or a callable layer -> C), checked as
    every editor checks it (`kvmem.editing.stats.checked_statistics`); None where none is given."""
    s = stats
    if isinstance(stats, Mapping):
        if layer not in stats:
            raise InvalidArgumentError(f"stats has no entry for edit layer {layer}; give one per layer in `layers`.")
        s = stats[layer]
    elif callable(stats) and not isinstance(stats, (Tensor, SecondMoment)):
        s = stats(layer)
    if s is None:
        return None
    if not isinstance(s, (Tensor, SecondMoment)):
        raise InvalidArgumentError(f"stats must be a SecondMoment, a tensor, a dict or a callable, got {type(s).__name__}.")
    return checked_statistics(s, layer, d_mlp, fingerprint=fingerprint, invertible=invertible)


def stress_edits(
    model,
    requests: Sequence[Fact],
    *,
    method: str = "r-rome",
    layers: int | Sequence[int] | None = None,
    stats: SecondMoment | Tensor | Mapping[int, SecondMoment | Tensor] | Callable | None = None,
    hparams: RomeHparams | None = None,
    every: int = 10,
    neighbours: Sequence[Fact] = (),
    known: Sequence[Fact] = (),
    gen_prompts: Sequence[str] = (),
    gen_tokens: int = 50,
    collapse_frac: float = 0.5,
    stop_at_collapse: bool = False,
    on_conflict: str = "raise",
    log: str | Path | None = None,
    restart: bool = False,
    stop_after: int | None = None,
    restore: bool = True,
    seed: int = 0,
    batch_size: int = 64,
    edit_batch: int = 1,
    memit: MemitHparams | None = None,
    progress: bool | None = None,
) -> StressResult:
    """Apply `requests` as ROME edits one after another and track what survives (module docstring).

    `method`: "rome" (reference-code update) or "r-rome" (homogeneous prefix-averaged key).
    `layers`: the edit layer, or a list over which edits are spread round-robin (edit i goes to
    `layers[i % len(layers)]`); default `hparams.layer`. `stats`: C per edit layer (a
    `SecondMoment`/tensor for one layer, a dict layer → C, or a callable); None only with
    `hparams.mom2_adjustment=False`. `hparams`: default the model's preset; its `update_key` is
    set by `method`, its seed by `seed`. `every`: checkpoint period (edits). `neighbours`,
    `known`: untouched `Fact`s whose `target_true` top-1 accuracy is tracked. `gen_prompts`,
    `gen_tokens`: generation entropy. `on_conflict`: "raise" or "skip" duplicate / conflicting
    requests (`check_requests`). A request whose edit is rejected (a `KvmemError`, e.g. the model
    already answers its target) is skipped and reported in `steps`. `log`: a `kvmem.runs.RunLog`
    path; an existing log of the same run is resumed (one of another run raises `RunLogError`;
    `restart=True` discards it; a log in the format before kvmem's `RunLog` is converted first).
    `progress`: None means `kvmem.config.PROGRESS`. `stop_after`: apply at most this many new edits in
    this call (rerun with the same log to continue). `restore=False` leaves the edits in the
    model (it is MUTATED then). `stop_at_collapse`: end the run at the first collapse.
    """
    t_start = time.perf_counter()
    requests = list(requests)
    if not requests:
        raise InvalidArgumentError("No edit requests; pass a list of Facts with target_new.")
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {sorted(METHODS)}, got {method!r}.")
    for name, v in (("every", every), ("gen_tokens", gen_tokens + 1), ("batch_size", batch_size),
                    ("edit_batch", edit_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}.")
    if not 0 < collapse_frac < 1:
        raise InvalidArgumentError(f"collapse_frac must be in (0, 1), got {collapse_frac!r}.")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0):
        raise InvalidArgumentError(f"stop_after must be None or an integer >= 0, got {stop_after!r}.")
    keep, skipped = check_requests(requests, on_conflict=on_conflict)

    hp = hparams or rome_hparams(model)
    batched = method in BATCHED
    if batched:
        mhp = memit or memit_hparams(model, null_space=method == "alphaedit")
        mhp = replace(mhp, null_space=method == "alphaedit", value=replace(mhp.value, seed=seed))
        if layers is None:
            layers = list(mhp.layers)
        hp = replace(mhp.value, layer=list(layers)[-1] if not isinstance(layers, int) else layers)
    else:
        if edit_batch != 1:
            raise InvalidArgumentError(f"edit_batch applies to {list(BATCHED)}; {method!r} edits one request at a time.")
        hp = replace(hp, update_key=METHODS[method], seed=seed)
    if layers is None:
        if hp.layer is None:
            raise InvalidArgumentError("Pass layers=... (the edit layer, or a list to spread edits) or hparams.layer.")
        layers = hp.layer
    layer_list = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
    if not layer_list:
        raise InvalidArgumentError("layers is empty; pass an int or a non-empty list of layers.")
    layer_list = [check_layer(model, l) for l in layer_list]
    d_mlp = int(model.cfg.d_mlp)
    if batched:
        mhp = replace(mhp, layers=tuple(layer_list))
    if len(set(layer_list)) > 1 and isinstance(stats, (Tensor, SecondMoment)):
        raise InvalidArgumentError(
            "Edits spread over several layers need C for each: pass stats={layer: second_moment(model, layer, corpus)}."
        )
    fp0 = model_fingerprint(model)
    # MEMIT/AlphaEdit always need C (λC + KᵀK, the null space); ROME unless mom2_adjustment is off
    needs_C = hp.mom2_adjustment or batched
    Cs = {l: _stats_for(stats, l, d_mlp, fingerprint=fp0, invertible=method != "alphaedit") if needs_C else None
          for l in set(layer_list)}
    if needs_C and any(C is None for C in Cs.values()):
        raise InvalidArgumentError("stats are needed for every edit layer" +
                                   ("." if batched else " (or hparams.mom2_adjustment=False)."))
    neighbours, known, gen_prompts = list(neighbours), list(known), list(gen_prompts)
    for name, fs in (("neighbours", neighbours), ("known", known)):
        for f in fs:
            if not isinstance(f, Fact) or f.target_true is None:
                raise InvalidArgumentError(f"{name} must hold kvmem.Facts with target_true.")

    stack_depth = len(getattr(model, "_kvmem_edit_stack", None) or [])
    originals = {l: mlp_weights(model, l).W_out.detach().clone() for l in set(layer_list)}
    settings = {
        "version": LOG_VERSION, "model_fingerprint": fp0, "requests": _requests_hash(requests),
        "n_requests": len(requests), "method": method, "layers": layer_list,
        "hparams": json.loads(json.dumps(asdict(hp))), "every": every, "seed": seed,
        # "neighborhood": the key logs have carried since the first version (resumable as they are)
        "neighborhood": _requests_hash(neighbours), "known": _requests_hash(known),
        "gen_prompts": hashlib.sha256(json.dumps(gen_prompts).encode()).hexdigest(), "gen_tokens": gen_tokens,
        "collapse_frac": collapse_frac, "on_conflict": on_conflict,
        "stats": {str(l): matrix_digest(C) if C is not None else None
                  for l, C in sorted(Cs.items())},
    }
    if batched:  # only for these methods, so that logs of ROME runs keep resuming
        settings.update(edit_batch=edit_batch, memit=json.loads(json.dumps(asdict(mhp))))

    # What an earlier run with this log already did (the context prefixes are part of the run:
    # sampled once, reused by every edit and by a resumed run).
    run_log = _open_log(log, settings, restart) if log is not None else None
    if run_log is not None and "prefixes" in run_log:
        prefixes = run_log["prefixes"]["prefixes"]
    else:
        prefixes = context_prefixes(model, hp)
        if run_log is not None:
            run_log.add("prefixes", {"prefixes": prefixes})
    logged = run_log.records() if run_log is not None else {}
    done_steps = {r["step"]: r for k, r in logged.items() if k.startswith("step-")}
    done_ckpts = {r["step"]: r for k, r in logged.items() if k.startswith("checkpoint-")}

    def append(rec: dict) -> None:
        if run_log is not None:
            run_log.add(f"{rec['kind']}-{rec['step']}", rec)

    steps: list[dict] = list(skipped)
    checkpoints: list[dict] = []
    applied: list[Fact] = []
    since_ckpt: list[Fact] = []
    touched: set[int] = set()
    baseline: dict = {}
    collapse_step: int | None = None
    collapse_reason: str | None = None
    resumed_from = 0
    new_edits = 0
    stopped_early = False

    def measure(step: int) -> dict:
        if step in done_ckpts:
            return done_ckpts[step]["metrics"]
        growth, delta = _norms(model, originals, touched)
        m = {
            "step": step,
            "retention": _accuracy(model, applied, "new", batch_size),
            "efficacy_last": _accuracy(model, since_ckpt, "new", batch_size),
            "neighborhood_acc": _accuracy(model, neighbours, "true", batch_size),
            "known_acc": _accuracy(model, known, "true", batch_size),
            "gen_entropy": _entropy(model, gen_prompts, gen_tokens, seed + step),
            "w_norm_growth": growth,
            "w_delta_rel": delta,
        }
        append({"kind": "checkpoint", "step": step, "metrics": m})
        return m

    def collapsed(m: dict) -> str | None:
        acc_key = "known_acc" if known else ("neighborhood_acc" if neighbours else None)
        if acc_key is not None:
            b = baseline[acc_key]
            if b == b and b > 0 and m[acc_key] < collapse_frac * b:
                return f"{acc_key} {m[acc_key]:.3f} < {collapse_frac} x unedited {b:.3f}"
        b = baseline["gen_entropy"]
        if b == b and b > 0 and m["gen_entropy"] == m["gen_entropy"] and m["gen_entropy"] < collapse_frac * b:
            return f"gen_entropy {m['gen_entropy']:.3f} < {collapse_frac} x unedited {b:.3f}"
        return None

    Ps = ({l: null_space(Cs[l], threshold=mhp.nullspace_threshold, relative=mhp.nullspace_relative).P for l in layer_list}
          if batched and mhp.null_space else {})
    Kp = {l: torch.zeros(d_mlp, d_mlp, dtype=torch.float64) for l in layer_list} if Ps else {}
    done_batches = {r["batch"]: r for k, r in logged.items() if k.startswith("batch-")}

    def run_batches() -> None:
        nonlocal resumed_from, new_edits, stopped_early, since_ckpt, collapse_step, collapse_reason
        bar = tqdm(total=len(keep), disable=not config.show_progress(progress), desc=f"stress {method}")
        for g, lo in enumerate(range(0, len(keep), edit_batch)):
            idxs = keep[lo : lo + edit_batch]
            if g in done_batches:
                rec = done_batches[g]
                resumed_from = lo + len(idxs)
            else:
                if stop_after is not None and new_edits >= stop_after:
                    stopped_early = True
                    break
                rec = {"kind": "batch", "batch": g, "indices": idxs, "layers": layer_list}
                try:
                    e = compute_memit_edit(model, [requests[i] for i in idxs], stats=Cs, hparams=mhp,
                                           null_spaces=Ps or None, prev_keys=Kp or None, prefixes=prefixes,
                                           _fingerprint="")
                except KvmemError as err:
                    rec.update(skipped={str(i): f"{type(err).__name__}: {err}" for i in idxs})
                else:
                    done = {id(r) for r in e.requests}
                    rec.update(applied=[i for i in idxs if id(requests[i]) in done],
                               skipped={str(idxs[s["index"]]): s["skipped"] for s in e.skipped},
                               U=[_b64(u) for u in e.U], V=[_b64(v) for v in e.V], KA=[_b64(k) for k in e.keys_after],
                               update_norm=float(sum(float(e.delta(j).norm()) ** 2 for j in range(len(e.layers))) ** 0.5),
                               seconds=e.seconds, residual=e.residual)
                new_edits += len(idxs)
                run_log.add(f"batch-{g}", rec) if run_log is not None else None
            if "U" in rec:
                n_new = len(rec["applied"])
                with torch.no_grad():
                    for j, l in enumerate(rec["layers"]):
                        U = _unb64(rec["U"][j]).reshape(d_mlp, n_new)
                        V = _unb64(rec["V"][j]).reshape(n_new, -1)
                        W = mlp_weights(model, l).W_out
                        W.add_((U @ V).to(W.device).to(W.dtype))
                        if Kp and rec["KA"]:
                            ka = _unb64(rec["KA"][j]).reshape(n_new, d_mlp)
                            Kp[l] += ka.T @ ka
                touched.update(rec["layers"])
            applied_here = set(rec.get("applied", []))
            for i in idxs:
                row = {"step": keep.index(i), "index": i, "subject": requests[i].subject, "batch": g}
                if i in applied_here:
                    applied.append(requests[i])
                    since_ckpt.append(requests[i])
                    row.update(update_norm=rec["update_norm"], seconds=rec["seconds"]["total"] / len(idxs),
                               seconds_values=rec["seconds"]["values"] / len(idxs),
                               seconds_solve=rec["seconds"]["solve"] / len(idxs), residual_after=rec["residual"]["after"])
                else:
                    row.update(skipped=rec["skipped"].get(str(i), "not applied"))
                steps.append(row)
            bar.update(len(idxs))
            pos = lo + len(idxs)
            if pos // every > lo // every or pos == len(keep):
                m = measure(pos)
                checkpoints.append(m)
                since_ckpt = []
                why = collapsed(m)
                if why is not None and collapse_step is None:
                    collapse_step, collapse_reason = pos, why
                    if stop_at_collapse:
                        break
        bar.close()

    try:
        baseline = measure(0)
        checkpoints.append(baseline)
        if batched:
            run_batches()
        bar = tqdm(keep if not batched else [], disable=not config.show_progress(progress), desc=f"stress {method}")
        for n, i in enumerate(bar):
            req = requests[i]
            layer = layer_list[n % len(layer_list)]
            if n in done_steps:
                rec = done_steps[n]
                resumed_from = n + 1
                if "u" in rec:
                    e = Edit(layer=rec["layer"], u=_unb64(rec["u"]), lam=_unb64(rec["lam"]),
                             k_star=torch.zeros(d_mlp, dtype=torch.float64),
                             v_star=torch.zeros(int(model.cfg.d_model), dtype=torch.float64),
                             request=req, model_fingerprint="", hparams=replace(hp, layer=rec["layer"]))
                    apply_edit(model, e, check=False)
            else:
                if stop_after is not None and new_edits >= stop_after:
                    stopped_early = True
                    break
                rec = {"kind": "step", "step": n, "index": i, "subject": req.subject, "layer": layer}
                try:
                    e = compute_rome_edit(model, req, layer=layer, stats=Cs[layer], hparams=hp, prefixes=prefixes,
                                          _fingerprint="")  # like replayed edits: mid-sequence models are unsaved
                except KvmemError as err:
                    rec.update(skipped=f"{type(err).__name__}: {err}")
                else:
                    apply_edit(model, e, check=False)  # computed on this very model just now
                    rec.update(u=_b64(e.u), lam=_b64(e.lam), update_norm=float(e.lam.norm() * e.u.norm()),
                               seconds=e.seconds, p_target=float(e.loss_trace[-1, 4]) if e.loss_trace.numel() else None)
                new_edits += 1
                append(rec)
            steps.append({k: v for k, v in rec.items() if k not in ("u", "lam", "kind")})
            if "u" in rec:
                applied.append(req)
                since_ckpt.append(req)
                touched.add(rec["layer"])
            if (n + 1) % every == 0 or n + 1 == len(keep):
                m = measure(n + 1)
                checkpoints.append(m)
                since_ckpt = []
                why = collapsed(m)
                if why is not None and collapse_step is None:
                    collapse_step, collapse_reason = n + 1, why
                    if stop_at_collapse:
                        break
        bar.close()
    finally:
        if restore:
            with torch.no_grad():
                for l, W0 in originals.items():
                    mlp_weights(model, l).W_out.copy_(W0)
            stack = getattr(model, "_kvmem_edit_stack", None)
            if stack is not None:
                del stack[stack_depth:]
    if stopped_early:
        warnings.warn(f"stress_edits stopped after {new_edits} new edits (stop_after); rerun with the same log to continue.",
                      stacklevel=2)
    return StressResult(
        method=method, layers=tuple(layer_list), checkpoints=tuple(checkpoints), steps=tuple(steps),
        baseline=baseline, collapse_step=collapse_step, collapse_reason=collapse_reason,
        n_applied=len(applied), n_skipped=sum(1 for s in steps if "skipped" in s),
        seconds=time.perf_counter() - t_start, log_path=str(run_log.path) if run_log is not None else None,
        resumed_from=resumed_from, config=settings,
    )


__all__ = ["stress_edits", "StressResult", "check_requests", "METHODS", "BATCHED"]
