"""CounterFact metrics for edits (ROME, Meng et al. 2022, §4), batched and reading only the
positions that predict target tokens.

Per record, as in ROME's code (`experiments/py/eval_utils_counterfact.py`, `summarize.py`):

- a target's score after a prompt is its teacher-forced log-probability; multi-token targets
  use the mean log-probability per token (`per_token=True`, ROME's code; `False` sums them,
  i.e. the full sequence probability);
- ES / EM: on the rewrite prompt, [P(new) > P(true)] and P(new) − P(true) (probabilities =
  exp of the scores); PS / PM: the same averaged over paraphrase prompts;
- NS / NM: on neighbourhood prompts (other subjects, same relation and true object),
  [P(true) > P(new)] and P(true) − P(new);
- GE: generation entropy, the mean over generation prompts of (2/3·H₂ + 4/3·H₃)/2, Hₙ the
  entropy in bits of the n-gram distribution of a 100-token top-5 sample (ROME's
  `compute_n_gram_entropy`; words split by a regex instead of NLTK's tokenizer);
- S: the harmonic mean of ES, PS and NS (the paper; one version of the code used PS and NS).

Tables report means over records ×100 (GE too), as ROME's tables do.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kvmem.core.backend import run_to_layer
from kvmem import config
from kvmem.data import CounterFactRecord
from kvmem.editing.apply import edited
from kvmem.editing.generate import sample_tokens
from kvmem.editing.rome import Edit, RomeHparams, compute_rome_edit, context_prefixes, rome_hparams
from kvmem.errors import InvalidArgumentError, KvmemError, PromptTooLongError
from kvmem.core.tokenize import encode, pad_batch, spec_for, target_token_ids
from kvmem.core.readout import final_logits

METRICS = ("S", "ES", "EM", "PS", "PM", "NS", "NM", "GE")

# ROME paper's CounterFact results for GPT-2 XL: the cells kvmem compares against; other cells left empty.
PUBLISHED_GPT2_XL = {
    "GPT-2 XL (ROME paper)": {"NS": 78.1},
    "ROME on GPT-2 XL (ROME paper)": {"ES": 100.0, "PS": 96.4, "NS": 75.4},
}


# --- scoring targets ------------------------------------------------------------------------

@torch.no_grad()
def target_logprobs(
    model, items: Sequence[tuple[str, str]], *, batch_size: int = 64
) -> tuple[Float[Tensor, "item"], Int[Tensor, "item"]]:
    """For each (prompt, target): the summed teacher-forced log-probability of the target's
    tokens after the prompt (with the model's start token), and the number of target tokens."""
    if batch_size < 1:
        raise InvalidArgumentError("batch_size must be at least 1.")
    spec = spec_for(model)
    device = next(model.parameters()).device
    rows, reads = [], []
    for prompt, target in items:
        ids = encode(spec, prompt)
        tids = target_token_ids(spec, prompt, target)
        if len(ids) + len(tids) - 1 > spec.n_ctx:
            raise PromptTooLongError(f"Prompt {prompt[:50]!r}… plus target exceeds the context of {spec.n_ctx}.")
        rows.append(ids + tids[:-1])
        reads.append([(len(ids) - 1 + j, t) for j, t in enumerate(tids)])
    sums = torch.zeros(len(items), dtype=torch.float64)
    counts = torch.tensor([len(r) for r in reads], dtype=torch.long)
    n_layers = model.cfg.n_layers
    for s in range(0, len(rows), batch_size):
        batch = pad_batch(rows[s : s + batch_size], spec.pad_id)
        resid = run_to_layer(model, batch.tokens.to(device), n_layers)
        r_idx = [i for i, rd in enumerate(reads[s : s + batch_size]) for _ in rd]
        p_idx = [p for rd in reads[s : s + batch_size] for p, _ in rd]
        t_idx = torch.tensor([t for rd in reads[s : s + batch_size] for _, t in rd], device=device)
        logp = final_logits(model, resid[r_idx, p_idx]).float().log_softmax(-1)
        picked = logp.gather(1, t_idx[:, None])[:, 0].double().cpu()
        sums[s : s + batch_size].index_add_(0, torch.tensor(r_idx), picked)
    return sums, counts


# --- generation entropy -------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def ngram_entropy(text: str, *, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's n-gram entropy of one text: mean over n of weightₙ · Hₙ (bits)."""
    words = _words(text)
    vals = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        vals.append(w * h)
    return sum(vals) / len(vals)


def generate_texts(
    model, prompts: Sequence[str], *, max_new_tokens: int = 100, top_k: int = 5, seed: int = 0
) -> list[str]:
    """One top-k sample per prompt (identical prompts share a batch), prompt text included."""
    spec = spec_for(model)
    gen = torch.Generator().manual_seed(seed)
    out: list[str | None] = [None] * len(prompts)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    for p, idx in groups.items():
        ids = encode(spec, p)
        n_new = min(max_new_tokens, spec.n_ctx - len(ids))
        if n_new < 1:
            raise PromptTooLongError(f"Generation prompt {p[:50]!r}… leaves no room in the context of {spec.n_ctx}.")
        if n_new < max_new_tokens:
            warnings.warn(f"Generating {n_new} instead of {max_new_tokens} tokens (context {spec.n_ctx}).", stacklevel=2)
        new = sample_tokens(model, torch.tensor(ids), len(idx), n_new, top_k, gen)
        for j, row in zip(idx, new.tolist()):
            out[j] = p + spec.tokenizer.decode(row, skip_special_tokens=True)
    return [t or "" for t in out]


# --- one record -----------------------------------------------------------------------------

def record_metrics(
    model,
    record: CounterFactRecord,
    *,
    per_token: bool = True,
    generation: bool = True,
    gen_prompts: int | None = None,
    gen_tokens: int = 100,
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """ES, EM, PS, PM, NS, NM (fractions / probability differences) and GE for one record."""
    (out,) = records_metrics(model, [record], per_token=per_token, generation=generation, gen_prompts=gen_prompts,
                             gen_tokens=gen_tokens, seed=seed, batch_size=batch_size)
    return out


def records_metrics(
    model,
    records: Sequence[CounterFactRecord],
    *,
    per_token: bool = True,
    generation: bool = True,
    gen_prompts: int | None = None,
    gen_tokens: int = 100,
    seed: int = 0,
    batch_size: int = 64,
) -> list[dict]:
    """`record_metrics` of several records under the same weights, their prompts scored together
    (`batch_size` prompt-target pairs per forward, across records): one forward per batch instead
    of one per record's last partial batch. Generation (GE) stays per record."""
    groups = []  # per record: metric letter E(fficacy), P(araphrase), N(eighbourhood) -> prompts
    items = []
    for record in records:
        rq = record.request
        new, true = rq.target("new"), rq.target("true")
        g = {"E": [rq.prompt], "P": list(record.paraphrase_prompts), "N": list(record.neighborhood_prompts)}
        groups.append(g)
        items += [(p, t) for ps in g.values() for p in ps for t in (new, true)]
    sums, counts = target_logprobs(model, items, batch_size=batch_size)
    score = (sums / counts if per_token else sums).view(-1, 2)  # [prompt, (new, true)]
    results, start = [], 0
    for record, g in zip(records, groups):
        out: dict = {}
        for key, ps in g.items():
            s = score[start : start + len(ps)]
            start += len(ps)
            if not ps:  # a record without paraphrases (or neighbours) has no PS, PM (or NS, NM)
                out.update({f"{key}S": float("nan"), f"{key}M": float("nan")})
                continue
            p_new, p_true = s[:, 0].exp(), s[:, 1].exp()
            if key == "N":  # neighbours must keep the true object
                out["NS"] = float((s[:, 1] > s[:, 0]).double().mean())
                out["NM"] = float((p_true - p_new).mean())
            else:
                out[f"{key}S"] = float((s[:, 0] > s[:, 1]).double().mean())
                out[f"{key}M"] = float((p_new - p_true).mean())
        if generation and record.generation_prompts:
            prompts = list(record.generation_prompts)[: gen_prompts or None]
            texts = generate_texts(model, prompts, max_new_tokens=gen_tokens, seed=seed)
            out["GE"] = sum(ngram_entropy(t) for t in texts) / len(texts)
        else:
            out["GE"] = float("nan")
        results.append(out)
    return results


# --- many records, with and without edits -------------------------------------------------

def _hmean(xs: Sequence[float]) -> float:
    if any(math.isnan(x) for x in xs):
        return float("nan")
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1 / x for x in xs)


@dataclass(frozen=True)
class CounterFactEval:
    """Per-record metrics (`frame`: one row per condition × case) and ROME's summary table."""

    frame: object  # pandas.DataFrame

    def to_frame(self):
        return self.frame

    def summary(self):
        """Means ×100 per condition in ROME's column order, S = hmean(ES, PS, NS)."""
        import pandas as pd

        rows = {}
        for cond, g in self.frame.groupby("condition", sort=False):
            ok = g[g["error"].isna()] if "error" in g else g
            r = {m: 100 * ok[m].mean() for m in METRICS if m != "S"}
            r["S"] = _hmean([r["ES"], r["PS"], r["NS"]])
            r["n"] = len(ok)
            r["n_failed"] = len(g) - len(ok)
            if "edit_s" in ok and ok["edit_s"].notna().any():
                r["edit_s"] = ok["edit_s"].mean()
            rows[cond] = r
        return pd.DataFrame.from_dict(rows, orient="index")[[*METRICS, "n", "n_failed", *(["edit_s"] if any("edit_s" in r for r in rows.values()) else [])]]

    def paired_frame(self, method: str = "ROME"):
        """One row per case evaluated with `method`: its metrics after the edit, and ES, PS, NS of
        the unedited model beside them (`ES_before`, ...). Cases whose edit failed are left out."""
        f = self.frame
        out = f[(f["condition"] == method) & f["error"].isna()].reset_index(drop=True)
        head = ["case_id", "subject", "target_true", "target_new"]
        if "layer" in out:
            out["layer"] = out["layer"].astype(int)  # a float column in the frame, NaN on unedited rows
            head.append("layer")
        before = f[f["condition"] == "unedited"].drop_duplicates("case_id").set_index("case_id")
        for m in ("ES", "PS", "NS"):
            out[f"{m}_before"] = out["case_id"].map(before[m]) if len(before) else float("nan")
        return out[head + ["ES_before", "PS_before", "NS_before", "ES", "EM", "PS", "PM", "NS", "NM", "GE"]]

    def to_markdown(self, floatfmt: str = ".1f", *, columns: Sequence[str] | None = None) -> str:
        """`summary()` as a Markdown table (`columns`: a subset, in this order)."""
        summ = self.summary()
        return markdown_table(summ if columns is None else summ[list(columns)], floatfmt)

    def plot(self, ax=None, *, title: str | None = None):
        """S, ES, PS and NS (×100) side by side for each condition. Returns the Figure."""
        import numpy as np

        from kvmem.viz import figure_axes

        fig, (ax,) = figure_axes(ax, 1, figsize=(6, 3.2))
        cols = ["S", "ES", "PS", "NS"]
        summ = self.summary()
        x = np.arange(len(cols))
        width = 0.8 / max(len(summ), 1)
        for k, (cond, row) in enumerate(summ.iterrows()):
            ax.bar(x + (k - (len(summ) - 1) / 2) * width, [row[c] for c in cols], width, label=cond)
        ax.set_xticks(x, cols)
        ax.set_ylim(0, 105)
        ax.set_ylabel("CounterFact metric (×100)")
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        return fig


def markdown_table(df, floatfmt: str = ".1f") -> str:
    """A pandas DataFrame as a Markdown table, its index as the first column (NaN left empty)."""
    cols = list(df.columns)
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for idx, row in df.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if isinstance(v, float):
                cells.append("" if math.isnan(v) else format(v, floatfmt))
            else:
                cells.append(str(v))
        lines.append(f"| {idx} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rome_editor(model, *, stats=None, hparams: RomeHparams | None = None,
                safe: bool | None = None, prefixes: Sequence[str] | None = None, null_space=None,
                ) -> Callable[[object, CounterFactRecord], Edit]:
    """`editor(model, record) -> Edit` for `evaluate_counterfact` / `evaluate_record`: ROME with
    `stats` (a `SecondMoment` or C for the edit layer) and `hparams` (default: the model's preset),
    its context prefixes sampled once here (or `prefixes`, e.g. a driver's for its workers) and reused
    for every record. `safe`: None = no check;
    False = predict the edit's interference on the record's neighbourhood prompts (records without
    any: no check) and warn above the threshold; True = refuse (`UnsafeEditError`), checking records
    without neighbours on kvmem's built-in facts the model answers. `null_space`: AlphaEdit's
    constraint on every edit (`kvmem.editing.nullspace.null_space(C)` of the edit layer's statistics;
    `compute_rome_edit`'s argument)."""
    hp = hparams or rome_hparams(model)
    ns_layer = getattr(null_space, "layer", None)
    if ns_layer is not None and ns_layer != hp.layer:
        raise InvalidArgumentError(f"The null space is layer {ns_layer}'s, the edit is at layer {hp.layer}; "
                                   "compute it from that layer's statistics.")
    if hp.mom2_adjustment and stats is None:
        raise InvalidArgumentError(
            "ROME needs stats=second_moment(model, layer, corpus) (or hparams with mom2_adjustment=False), "
            "or pass a custom editor=..."
        )
    prefixes = list(prefixes) if prefixes is not None else context_prefixes(model, hp)

    def editor(m, rec: CounterFactRecord) -> Edit:
        edit = compute_rome_edit(m, rec.request, stats=stats, hparams=hp, prefixes=prefixes, null_space=null_space)
        check_interference(m, rec, edit, safe=safe)
        return edit

    return editor


def check_interference(model, record: CounterFactRecord, edit: Edit, *, safe: bool | None):
    """`rome_editor`'s check of a ROME edit, returned (`kvmem.predict_interference`'s
    `Interference`, or None when nothing was checked). `safe`: None = no check; False = predict
    the interference on the record's neighbourhood prompts (records without any: no check) and warn
    (`InterferenceWarning`) above the threshold; True = refuse (`UnsafeEditError`), checking records
    without neighbours on kvmem's built-in facts the model answers. Costs about a tenth of the edit
    (one forward and backward pass over two rows per neighbour; docs/interference.md)."""
    # warnings only where the record brings its neighbours; a refusal always checks something
    if not (safe or (safe is not None and record.neighborhood_prompts)):
        return None
    from kvmem.editing.interference import predict_interference, warn_or_refuse

    banks = ("neighbourhood",) if record.neighborhood_prompts else ("known",)
    result = predict_interference(model, record, edit=edit, banks=banks, require_known=False)
    warn_or_refuse(result, safe=bool(safe))
    return result


def batch_editor(model, records: Sequence[CounterFactRecord], *, stats, hparams, batch_size: int,
                 progress: bool = False, save_dir=None) -> Callable[[object, CounterFactRecord], object]:
    """`editor(model, record)` that writes `records` in batches of `batch_size` (in their order) with
    one `compute_memit_edit` per batch (`hparams`: a `MemitHparams`; AlphaEdit when its null_space
    is set; `stats`: C per layer) and returns the edit of the record's batch, computed on first use.
    A record its batch skipped (duplicate, already answered) raises `InvalidArgumentError` with the reason.
    `progress`: a bar over each batch's v* fits (`compute_memit_edit`). `save_dir`: each batch's edit
    is saved there (`batch_edit_path`) and read back instead of recomputed when the same batch comes
    again with the same weights, settings and statistics (a run stopped while scoring resumes
    without refitting v*; `kvmem.load_edit` reads the files)."""
    from kvmem.editing.memit import compute_memit_edit
    from kvmem.editing.multi_edit import MultiLayerEdit

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}.")
    where = {id(r): i // batch_size for i, r in enumerate(records)}
    prefixes = context_prefixes(model, hparams.value)
    memo: dict[int, object] = {}  # the current batch's edit, or the error its batch raised

    def editor(m, rec: CounterFactRecord):
        if id(rec) not in where:
            raise InvalidArgumentError("batch_editor got a record outside the records it was made for.")
        b = where[id(rec)]
        if b not in memo:
            memo.clear()  # batches are visited in order: keep one edit alive
            batch = [r.request for r in records[b * batch_size:(b + 1) * batch_size]]
            path = None if save_dir is None else batch_edit_path(save_dir, m, b, batch, stats, hparams, prefixes)
            try:
                if path is not None and path.exists():
                    memo[b] = MultiLayerEdit.load(path)
                else:
                    memo[b] = compute_memit_edit(m, batch, stats=stats, hparams=hparams, prefixes=prefixes,
                                                 progress=progress)
                    if path is not None:
                        memo[b].save(path)
            except KvmemError as err:  # every record of the batch fails alike: computed once, not per record
                memo[b] = err
        edit = memo[b]
        if isinstance(edit, KvmemError):
            raise edit
        # by position in the batch: an edit read back from its file holds copies of the requests
        why = next((s["skipped"] for s in edit.skipped if records[b * batch_size + s["index"]] is rec), None)
        if why is not None:
            raise InvalidArgumentError(f"record skipped by its batch: {why}")
        return edit

    return editor


def batch_edit_path(save_dir, model, index: int, batch, stats, hparams, prefixes):
    """Where `batch_editor` keeps batch `index`'s edit: `save_dir/batch_<index>-<digest>.safetensors`,
    the digest over everything the edit depends on (the model's weights, the requests, the settings,
    the context prefixes and each layer's C), so a changed input never reads a stale edit."""
    import hashlib
    from dataclasses import asdict
    from pathlib import Path

    from kvmem.core.fingerprint import fingerprints, matrix_digest

    h = hashlib.sha256()
    for part in (fingerprints(model)[0], repr(list(batch)), repr(asdict(hparams)), repr(list(prefixes))):
        h.update(part.encode() + b"\0")
    for layer in sorted(stats):
        C = getattr(stats[layer], "C", stats[layer])
        h.update(f"{layer}:{matrix_digest(C)}".encode() + b"\0")
    return Path(save_dir) / f"batch_{index:04d}-{h.hexdigest()[:16]}.safetensors"


def evaluate_record(
    model,
    record: CounterFactRecord,
    *,
    editor: Callable[[object, CounterFactRecord], Edit] | None = None,
    method: str = "ROME",
    unedited: bool = True,
    per_token: bool = True,
    generation: bool = True,
    gen_prompts: int | None = None,
    gen_tokens: int = 100,
    seed: int = 0,
    batch_size: int = 64,
) -> list[dict]:
    """The rows `evaluate_counterfact` gives one record: the unedited model's metrics (when
    `unedited`), then, with an `editor`, the metrics with `editor(model, record)` applied (then
    restored exactly), or the editor's error (a `KvmemError`) in the `error` column."""
    (rows,) = evaluate_records(model, [record], editor=editor, method=method, unedited=unedited, per_token=per_token,
                               generation=generation, gen_prompts=gen_prompts, gen_tokens=gen_tokens, seed=seed,
                               batch_size=batch_size)
    return rows


def evaluate_records(
    model,
    records: Sequence[CounterFactRecord],
    *,
    editor: Callable[[object, CounterFactRecord], Edit] | None = None,
    method: str = "ROME",
    unedited: bool = True,
    **kw,
) -> list[list[dict]]:
    """`evaluate_record`'s rows for each of `records`, scored together: the unedited metrics of
    all of them in shared forwards (`records_metrics`), then every record's edit computed on the
    unedited model, and the records sharing an edit (a MEMIT batch from `batch_editor`) scored
    together under it, applied once. Each row's `eval_s` is its group's scoring time divided
    among the group's records. `kw`: `records_metrics`'s scoring options."""
    bases = [{"case_id": r.case_id, "subject": r.subject, "target_true": r.request.target_true,
              "target_new": r.request.target_new} for r in records]
    rows: list[list[dict]] = [[] for _ in records]
    if unedited:
        t = time.perf_counter()
        metrics = records_metrics(model, records, **kw)
        share = (time.perf_counter() - t) / len(records)
        for i, m in enumerate(metrics):
            rows[i].append({"condition": "unedited", **bases[i], **m, "eval_s": share, "error": None})
    if editor is None:
        return rows
    edits: dict[int, object] = {}
    for i, record in enumerate(records):
        try:
            edits[i] = editor(model, record)
        except KvmemError as e:
            edits[i] = e
    groups: dict[int, list[int]] = {}  # id(edit) -> record indices, in order
    for i, e in edits.items():
        if not isinstance(e, KvmemError):
            groups.setdefault(id(e), []).append(i)
    scored: dict[int, tuple[dict, float]] = {}
    for members in groups.values():
        edit = edits[members[0]]
        t = time.perf_counter()
        with edited(model, edit, check=False):  # computed on this very model just now
            metrics = records_metrics(model, [records[i] for i in members], **kw)
        share = (time.perf_counter() - t) / len(members)
        scored.update({i: (m, share) for i, m in zip(members, metrics)})
    for i, edit in edits.items():
        if isinstance(edit, KvmemError):
            rows[i].append({"condition": method, **bases[i], "error": f"{type(edit).__name__}: {edit}"})
            continue
        if isinstance(edit, Edit):
            about = {"edit_s": edit.seconds, "layer": edit.layer, "v_steps": int(edit.loss_trace.shape[0]),
                     "final_p_target": float(edit.loss_trace[-1, 4]) if edit.loss_trace.numel() else float("nan")}
        else:  # a multi-layer (MEMIT/AlphaEdit) edit of a batch this record belongs to: its time is the batch's
            about = {"edit_s": edit.seconds.get("total", float("nan")), "layer": edit.layers[-1],
                     "layers": list(edit.layers), "batch_size": edit.n_requests}
        m, share = scored[i]
        rows[i].append({"condition": method, **bases[i], **m, **about, "eval_s": share, "error": None})
    return rows


def counterfact_frame(rows: Sequence[dict]):
    """`evaluate_record` rows as one DataFrame with every metric column (NaN where not measured)."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    for m in METRICS[1:]:
        if m not in frame:
            frame[m] = float("nan")
    return frame


def evaluate_counterfact(
    model,
    records: Sequence[CounterFactRecord],
    *,
    editor: Callable[[object, CounterFactRecord], Edit] | bool | None = None,
    stats=None,
    hparams: RomeHparams | None = None,
    method: str = "ROME",
    unedited: bool = True,
    per_token: bool = True,
    generation: bool = True,
    gen_prompts: int | None = None,
    gen_tokens: int = 100,
    seed: int = 0,
    batch_size: int = 64,
    record_batch: int = 1,
    null_space=None,
    progress: bool | None = None,
    log: str | None = None,
    restart: bool = False,
) -> CounterFactEval:
    """CounterFact metrics of the unedited model and of each record's edit applied alone (then
    restored exactly; `evaluate_record` per record). The model is unchanged afterwards.

    `log`: a resumable run log (`kvmem.runs.RunLog`, one JSON line per record); rerunning with
    the same settings skips finished records, other settings raise unless `restart=True`. Only
    the default ROME editor can be logged (a custom editor's settings cannot be checked).

    `editor(model, record) -> Edit` defaults to `rome_editor(model, stats=stats, hparams=hparams)`
    (its context prefixes sampled once and reused). A record whose edit is rejected (a
    `KvmemError`) gets its message in the `error` column and is left out of the summary.
    `editor=False` evaluates only the unedited model. `progress`: None means `kvmem.config.PROGRESS`.
    `null_space`: the default editor's AlphaEdit constraint (`rome_editor`'s; logged by its
    threshold, rank and P's digest).
    `record_batch`: records scored together (`evaluate_records`: their prompts share forwards, a
    MEMIT batch's records are scored under one application of its edit); `batch_size`: prompt-target
    pairs per forward. Neither changes a metric. Default 1: on a CPU, chunks are not faster (Gemma-3-270m:
    0.88-0.92x, the padding of mixed records; benchmarks/bench_eval_throughput.py).
    """
    records = list(records)
    if not records:
        raise InvalidArgumentError("No CounterFact records to evaluate.")
    editor_is_default = editor is None
    hp = None
    if editor is None:
        hp = hparams or rome_hparams(model)
        # raises without the statistics ROME needs
        editor = rome_editor(model, stats=stats, hparams=hp, null_space=null_space)
    elif null_space is not None:
        raise InvalidArgumentError("null_space= constrains the default ROME editor; give it to your editor instead.")

    kw = dict(per_token=per_token, generation=generation, gen_prompts=gen_prompts, gen_tokens=gen_tokens,
              seed=seed, batch_size=batch_size)
    run_log = None
    if log is not None:
        run_log = _counterfact_log(model, log, restart, editor_is_default, hp if editor_is_default else None,
                                   stats, method, unedited, kw, null_space)
    if isinstance(record_batch, bool) or not isinstance(record_batch, int) or record_batch < 1:
        raise InvalidArgumentError(f"record_batch must be a positive integer, got {record_batch!r}.")
    conds = (["unedited"] if unedited else []) + ([method] if editor is not False else [])
    show = config.show_progress(progress)
    bar = tqdm(total=len(records) * len(conds), disable=not show, desc="CounterFact")
    done: dict[int, list[dict]] = {}
    pending = []
    for i, rec in enumerate(records):
        if run_log is not None and str(rec.case_id) in run_log:
            done[i] = run_log[str(rec.case_id)]["rows"]
            bar.update(len(conds))
        else:
            pending.append(i)
    for lo in range(0, len(pending), record_batch):
        chunk = pending[lo : lo + record_batch]
        rows = evaluate_records(model, [records[i] for i in chunk], editor=editor or None, method=method,
                                unedited=unedited, **kw)
        for i, r in zip(chunk, rows):
            done[i] = r
            if run_log is not None:
                run_log.add(str(records[i].case_id), {"rows": r})
            bar.update(len(conds))
    bar.close()
    return CounterFactEval(counterfact_frame([row for i in range(len(records)) for row in done[i]]))


def _stats_identity(stats):
    from kvmem.core.fingerprint import tensors_checksum

    if stats is None:
        return None
    if isinstance(stats, Tensor):
        return tensors_checksum({"C": stats})
    return [stats.layer, stats.n_tokens, stats.corpus_fingerprint, stats.model_fingerprint]


def _counterfact_log(model, path, restart, editor_is_default, hp, stats, method, unedited, kw, null_space=None):
    import dataclasses

    from kvmem.core.fingerprint import model_fingerprint
    from kvmem.runs import RunLog

    if not editor_is_default:
        raise InvalidArgumentError(
            "log=... works with the default ROME editor only (a custom editor's settings cannot be "
            "checked on resume); drop log= or editor=."
        )
    settings = {
        "analysis": "counterfact", "model": model_fingerprint(model), "method": method, "unedited": unedited,
        # layer_source only documents where a preset's layer came from; it changes no number
        "hparams": {k: v for k, v in dataclasses.asdict(hp).items() if k != "layer_source"} if hp is not None else None,
        "stats": _stats_identity(stats),
        **kw,
    }
    if null_space is not None:  # only when set, so the logs of unconstrained runs still resume
        from kvmem.core.fingerprint import matrix_digest

        settings["null_space"] = {"threshold": getattr(null_space, "threshold", None),
                                  "relative": getattr(null_space, "relative", None),
                                  "rank": getattr(null_space, "rank", None),
                                  "P": matrix_digest(getattr(null_space, "P", null_space))}
    return RunLog(path, settings, restart=restart)


def published_table():
    """ROME's published GPT-2 XL CounterFact numbers (the cells kvmem compares against), ROME layout."""
    import pandas as pd

    return pd.DataFrame.from_dict(PUBLISHED_GPT2_XL, orient="index").reindex(columns=list(METRICS))
