"""The batched engine under causal tracing and integrated gradients: record a run once, then
run many modified rows through only the layers and positions they can change.

Vocabulary: a *recorded run* (`record_run`) keeps what continuing it needs: the residual stream
entering every layer, every MLP and attention output, and every layer's attention keys/values.
A *row group* (`RowGroup`) is a set of rows that enter the network at one layer with a given
residual, for the positions from `start_pos` on; `forward_rows` runs them to the end.

The shared primitive, `forward_rows(model, run, groups, start_pos, fwd_hooks=...)`:

- groups are sorted by their layer and join the batch there, so block j runs once, with exactly
  the rows that need it (the rows of every group starting at or below j);
- rows run only positions `start_pos..end`, attending to the recorded keys/values of positions
  before `start_pos` (TransformerLens's key/value-cache path, so rotary offsets, grouped-query
  attention and local windows are the model's own code); each row names the recorded row whose
  prefix it continues (`RowGroup.kv_rows`);
- `fwd_hooks` act during the pass (restores, freezes, IG's scaled neurons); the pass runs under
  the caller's grad mode, so integrated gradients differentiates through it and tracing does not;
- it returns the final residual of every row (positions `start_pos..end`); the caller reads out
  what it needs (`kvmem.core.readout.final_logits` of the positions it scores).

Its two users:

- `run_interventions` (causal tracing, activation patching): a *base* run is the run intervened
  in (the noise-corrupted prompt, one row per noise sample, or a corrupted second prompt); a
  *source* run supplies the values restored (the clean prompt). An `Intervention` restores a set
  of sites from the source and optionally holds others frozen at base values. A restoration at
  (layer l, position t) leaves every state below l and before t equal to the base run, so its
  row starts at layer l from the base run's residual (a restored residual at the boundary is
  written into that starting residual) at position t; rows that cannot change the readout are
  not run at all (the read position is before t, or every restored value equals the base value
  already there). Rows are grouped by start position, cut into chunks of at most `batch_size`
  rows (default: as many as fit `memory_budget`), and each chunk is one `forward_rows` call.
- `kvmem.neurons.integrated_gradients`: one clean run recorded (with its MLP neurons captured);
  row (layer l, node a) scales layer l's neurons at the last prompt position P, so it starts at
  layer l from the clean residual at position P, continuing the clean run's prefix; one
  `forward_rows` call per chunk of nodes, with gradients.

What is not shared, and why. Each user plans its own rows and reads its own output: tracing
skips rows that cannot matter, groups by start position and scores one position per row with a
caller's metric; IG has one start position, keeps every layer's activations for a backward pass
and scores teacher-forced target tokens. Their memory estimates differ for the same reason
(`rows_for_budget(..., with_grad=True)` counts the activations a backward pass keeps) and stay two
formulas, so that each analysis batches (and therefore rounds) exactly as before. The residual a
group enters with is built by its caller: tracing copies the base rows it needs and writes
restored boundary values into them; IG broadcasts the one clean row without a copy. The numbers
are bit-identical to the two engines this replaced (tests/test_golden.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvmem import config
from kvmem.core import bridge
from kvmem.core.backend import is_bridge
from kvmem.core.hooks import capture, has_hook, restore_at
from kvmem.core.readout import final_logits
from kvmem.errors import InvalidArgumentError, LayerOutOfRangeError

Component = Literal["resid_pre", "resid_post", "mlp_out", "attn_out"]
COMPONENTS: tuple[str, ...] = ("resid_pre", "resid_post", "mlp_out", "attn_out")
Metric = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Site:
    """One activation vector: `component` of `layer` at token `position`."""

    component: str
    layer: int
    position: int

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise InvalidArgumentError(
                f"Unknown component {self.component!r}; use one of {', '.join(COMPONENTS)}."
            )


@dataclass(frozen=True)
class Intervention:
    """Restore `restore` sites from the source run; hold `freeze` sites at the base run's values.

    Freezes act on layers above the first restored one (below it everything is the base run
    already). Where a site is both restored and frozen, the freeze wins.
    """

    restore: tuple[Site, ...]
    freeze: tuple[Site, ...] = ()


@dataclass(frozen=True)
class RecordedRun:
    """One forward pass, recorded for the engine (rows = noise samples or prompts)."""

    tokens: Int[Tensor, "pos"]
    resid: Float[Tensor, "layer_plus_1 row pos d_model"]
    mlp_out: Float[Tensor, "layer row pos d_model"] | None
    attn_out: Float[Tensor, "layer row pos d_model"] | None
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    shortformer_pos_embed: Tensor | None = None

    @property
    def n_rows(self) -> int:
        return int(self.resid.shape[1])

    @property
    def n_pos(self) -> int:
        return int(self.resid.shape[2])

    @property
    def n_layers(self) -> int:
        return int(self.resid.shape[0]) - 1

    def activation(self, component: str, layer: int) -> Float[Tensor, "row pos d_model"]:
        """The recorded `component` of `layer` (`resid_post` of l is `resid_pre` of l + 1)."""
        if component == "resid_pre":
            return self.resid[layer]
        if component == "resid_post":
            return self.resid[layer + 1]
        table = self.mlp_out if component == "mlp_out" else self.attn_out
        if table is None:
            raise InvalidArgumentError(f"This model has no {component} hook point (attention-only model?).")
        return table[layer]

    def final_logits(self, model, read_pos: int = -1) -> Float[Tensor, "row d_vocab"]:
        """Next-token logits of every row at `read_pos` (only that position is unembedded)."""
        return final_logits(model, self.resid[-1][:, read_pos])


def _cache_entry_class():
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    return TransformerLensKeyValueCacheEntry


@torch.no_grad()
def record_run(
    model,
    tokens: Int[Tensor, "pos"] | Int[Tensor, "row pos"],
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    n_rows: int | None = None,
) -> RecordedRun:
    """Run `tokens` once (with `fwd_hooks`, e.g. `add_noise` on `hook_embed`) and record it.

    1-d `tokens` are repeated `n_rows` times (default 1): a noise-corrupted base run is one row
    per noise sample. Rows must be unpadded prompts of one length. `fwd_hooks` may also keep
    other activations of the run (`kvmem.core.hooks.capture`).
    """
    if tokens.dim() == 1:
        tokens = tokens[None].expand(n_rows or 1, -1)
    elif n_rows is not None and n_rows != tokens.shape[0]:
        raise InvalidArgumentError(f"n_rows={n_rows} but tokens has {tokens.shape[0]} rows.")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise InvalidArgumentError(
            f"{tokens.shape[1]} tokens exceed the model's context of {model.cfg.n_ctx}; shorten the prompt."
        )
    n_layers = model.cfg.n_layers
    has_mlp = all(has_hook(model, f"blocks.{i}.hook_mlp_out") for i in range(n_layers))
    has_attn = all(has_hook(model, f"blocks.{i}.hook_attn_out") for i in range(n_layers))
    mlp_out: dict[int, Tensor] = {}
    attn_out: dict[int, Tensor] = {}
    # cloned: the recorded outputs outlive the pass, and later hooks may write in place
    keep = []
    for i in range(n_layers):
        if has_mlp:
            keep.append((f"blocks.{i}.hook_mlp_out", capture(mlp_out, i, clone=True)))
        if has_attn:
            keep.append((f"blocks.{i}.hook_attn_out", capture(attn_out, i, clone=True)))
    device = model.cfg.device
    tokens = tokens.to(device)
    shortformer = None
    if is_bridge(model):
        resids, keys, values = bridge.record(model, tokens, fwd_hooks, keep)
    else:
        resids, keys, values, shortformer = _record_hooked(model, tokens, fwd_hooks, keep)
    return RecordedRun(
        tokens=tokens[0].detach().cpu(),
        resid=torch.stack(resids),
        mlp_out=torch.stack([mlp_out[i] for i in range(n_layers)]) if has_mlp else None,
        attn_out=torch.stack([attn_out[i] for i in range(n_layers)]) if has_attn else None,
        keys=keys,
        values=values,
        shortformer_pos_embed=shortformer,
    )


def _record_hooked(model, tokens, fwd_hooks, keep):
    Entry = _cache_entry_class()
    n_layers, batch = model.cfg.n_layers, tokens.shape[0]
    with model.hooks(fwd_hooks=list(fwd_hooks) + keep):
        # No padding: the attention mask is all ones, so it is left out (as in a plain forward).
        resid, _, shortformer, _ = model.input_to_embed(tokens)
        resids = [resid]
        entries = [Entry.init_cache_entry(model.cfg, resid.device, batch) for _ in range(n_layers)]
        for i, block in enumerate(model.blocks):
            resid = block(resid, past_kv_cache_entry=entries[i], shortformer_pos_embed=shortformer)
            resids.append(resid)
    return resids, tuple(e.past_keys for e in entries), tuple(e.past_values for e in entries), shortformer


def rows_for_budget(
    model, n_pos: int, memory_budget: int = config.DEFAULT_MEMORY_BUDGET, *, with_grad: bool = False
) -> int:
    """How many rows of `n_pos` tokens one `forward_rows` pass may hold within `memory_budget` bytes.

    Without gradients a block's activations are freed once the next block has run, so a row costs
    one block's activations plus its logits. `with_grad=True` (integrated gradients) counts every
    layer's activations, which the backward pass keeps, and float32 logits and their gradients.
    """
    cfg = model.cfg
    d_mlp = cfg.d_mlp or 0
    if with_grad:
        per_row = 4 * n_pos * (3 * cfg.d_vocab + cfg.n_layers * (8 * d_mlp + 16 * cfg.d_model))
        return max(1, int(memory_budget // max(1, per_row)))
    item = torch.empty((), dtype=cfg.dtype).element_size()
    per_row = item * (
        n_pos * (6 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * n_pos + 4 * cfg.n_heads * cfg.d_head)
        + 5 * cfg.d_vocab  # logits and the temporaries of the bias add, the metric's softmax (measured: bench_tracing_memory)
    )
    return max(1, min(8192, int(memory_budget // max(per_row, 1))))


@dataclass(frozen=True)
class RowGroup:
    """Rows that enter the network at `layer` (0..n_layers; n_layers: after the last block).

    `resid[k]` is row k's residual stream entering `layer` at positions `start_pos..end` (the
    `start_pos` given to `forward_rows`); `kv_rows[k]` is the row of the recorded run whose
    keys/values row k attends to for the positions before `start_pos`.
    """

    layer: int
    resid: Float[Tensor, "row suffix d_model"]
    kv_rows: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.kv_rows) != self.resid.shape[0]:
            raise InvalidArgumentError(
                f"RowGroup at layer {self.layer}: {self.resid.shape[0]} residual rows but {len(self.kv_rows)} kv_rows."
            )


def forward_rows(
    model,
    run: RecordedRun,
    groups: Sequence[RowGroup],
    start_pos: int,
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
) -> Float[Tensor, "row suffix d_model"]:
    """Run every group's rows from its layer to the end of the network; the final residual of all
    rows, in group order (the batch row of a group's row k is its offset among the groups plus k).

    Groups must come sorted by layer. Each block runs once, on the rows of every group that has
    joined by then; rows cover positions `start_pos..end` and attend to `run`'s recorded keys and
    values of the positions before `start_pos`. `fwd_hooks` are active during the pass and see
    batch rows as numbered above (a hook at layer j sees only the rows that have joined by j).
    Gradients flow where the caller's grad mode and inputs allow.
    """
    n_layers = model.cfg.n_layers
    layers = [g.layer for g in groups]
    if not groups:
        raise InvalidArgumentError("forward_rows needs at least one RowGroup.")
    if layers != sorted(layers) or not 0 <= layers[0] or layers[-1] > n_layers:
        raise InvalidArgumentError(f"RowGroup layers must be sorted and within 0..{n_layers}, got {layers}.")
    if not 0 <= start_pos < run.n_pos:
        raise InvalidArgumentError(f"start_pos {start_pos} is outside the recorded run's positions 0..{run.n_pos - 1}.")
    kv_rows = [r for g in groups for r in g.kv_rows]
    if any(not 0 <= r < run.n_rows for r in kv_rows):
        raise InvalidArgumentError(f"kv_rows must index the recorded run's rows 0..{run.n_rows - 1}.")
    if is_bridge(model):
        return bridge.forward_rows(model, run, groups, start_pos, fwd_hooks)
    Entry = _cache_entry_class()
    shortformer = run.shortformer_pos_embed
    # which recorded row's prefix each batch row continues; a one-row run is broadcast, not copied
    kv_index = None if run.n_rows == 1 else torch.tensor(kv_rows, device=run.resid.device)
    resid = None
    g = 0
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for layer in range(layers[0], n_layers + 1):
            while g < len(groups) and groups[g].layer == layer:  # rows starting here join the batch
                joining = groups[g].resid
                resid = joining if resid is None else torch.cat([resid, joining])
                g += 1
            if layer == n_layers:
                break
            rows = resid.shape[0]
            entry = None
            if start_pos > 0:
                keys, values = run.keys[layer][:, :start_pos], run.values[layer][:, :start_pos]
                if kv_index is None:
                    keys, values = keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)
                else:
                    keys, values = keys[kv_index[:rows]], values[kv_index[:rows]]
                entry = Entry(past_keys=keys, past_values=values, frozen=True)
            sf = None if shortformer is None else shortformer[:1, start_pos:].expand(rows, -1, -1)
            resid = model.blocks[layer](resid, past_kv_cache_entry=entry, shortformer_pos_embed=sf)
    return resid


@dataclass(frozen=True)
class _Row:
    intervention: int
    sample: int
    start_layer: int
    start_pos: int


def _entry_index(site: Site) -> int:
    """The layer at which a row restoring `site` must start (resid_post l enters layer l + 1)."""
    return site.layer + 1 if site.component == "resid_post" else site.layer


def _hook_name(site: Site, n_layers: int) -> str:
    if site.component in ("mlp_out", "attn_out"):
        return f"blocks.{site.layer}.hook_{site.component}"
    j = _entry_index(site)
    return f"blocks.{j}.hook_resid_pre" if j < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def _validate(model, base: RecordedRun, source: RecordedRun, interventions) -> None:
    n_layers, n_pos = model.cfg.n_layers, base.n_pos
    if source.n_pos != n_pos:
        raise InvalidArgumentError(
            f"The source prompt has {source.n_pos} tokens and the base prompt {n_pos}; "
            "patching between prompts needs prompts of the same token length."
        )
    if source.n_rows not in (1, base.n_rows):
        raise InvalidArgumentError(
            f"The source run has {source.n_rows} rows; it needs 1 (shared) or {base.n_rows} (one per base row)."
        )
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise InvalidArgumentError("interventions must be kvmem.core.engine.Intervention objects.")
        if not iv.restore:
            raise InvalidArgumentError("An Intervention needs at least one site to restore.")
        for s in iv.restore + iv.freeze:
            if not 0 <= s.layer < n_layers:
                raise LayerOutOfRangeError(f"{s} is outside the model's layers 0..{n_layers - 1}.")
            if not 0 <= s.position < n_pos:
                raise InvalidArgumentError(f"{s} is outside the prompt's positions 0..{n_pos - 1}.")


@torch.no_grad()
def run_interventions(
    model,
    base: RecordedRun,
    source: RecordedRun,
    interventions: Sequence[Intervention],
    metric: Metric,
    *,
    read_pos: int = -1,
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
    reuse_prefix: bool = True,
    progress: bool = False,
) -> Float[Tensor, "intervention row"]:
    """`metric(logits at read_pos)` for every intervention applied to every base row.

    `metric` maps next-token logits `[rows, d_vocab]` to one number per row `[rows]` (e.g. the
    answer's probability). Returns `[len(interventions), base.n_rows]`. `batch_size`: rows per
    forward pass (None: as many as fit `memory_budget` bytes). `reuse_prefix=False` recomputes
    every position from 0 instead of continuing the base run's keys/values (a check, not faster).
    `progress`: a bar over the chunks, off by default: this is the inner loop of the analyses,
    which show their own bars.
    """
    _validate(model, base, source, interventions)
    n_pos, n_base = base.n_pos, base.n_rows
    read = read_pos % n_pos
    base_values = metric(base.final_logits(model, read)).float()
    out = base_values[None, :].repeat(len(interventions), 1)
    if batch_size is not None and batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}.")

    def src_row(s: int) -> int:
        return s if source.n_rows == n_base else 0

    # 1. Plan rows, skipping those that provably cannot change the readout.
    rows: list[_Row] = []
    for i, iv in enumerate(interventions):
        start_layer = min(_entry_index(s) for s in iv.restore)
        start_pos = min(s.position for s in iv.restore) if reuse_prefix else 0
        if min(s.position for s in iv.restore) > read:
            continue
        same = torch.ones(n_base, dtype=torch.bool, device=base.resid.device)
        for s in iv.restore:
            b = base.activation(s.component, s.layer)[:, s.position]
            c = source.activation(s.component, s.layer)[:, s.position].expand_as(b)
            same &= (b == c).all(dim=-1)
        for smp in range(n_base):
            if not bool(same[smp]):
                rows.append(_Row(i, smp, start_layer, start_pos))

    groups: dict[int, list[_Row]] = defaultdict(list)
    for r in rows:
        groups[r.start_pos].append(r)
    chunks: list[list[_Row]] = []
    for t0 in sorted(groups):
        members = sorted(groups[t0], key=lambda r: (r.start_layer, r.intervention, r.sample))
        limit = batch_size or rows_for_budget(model, n_pos - t0, memory_budget)
        chunks += [members[k : k + limit] for k in range(0, len(members), limit)]

    iterator = chunks
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(chunks, desc="patching", unit="chunk")
    for chunk in iterator:
        values = _run_chunk(model, base, source, interventions, chunk, read, src_row)
        for r, v in zip(chunk, metric(values).float().tolist()):
            out[r.intervention, r.sample] = v
    return out


def _run_chunk(model, base, source, interventions, chunk: list[_Row], read: int, src_row) -> Tensor:
    """Logits at `read` for the rows of one chunk (all with the same start position, sorted by
    start layer): one `forward_rows` pass, restores and freezes as hooks."""
    n_layers = model.cfg.n_layers
    t0 = chunk[0].start_pos
    # per-row lookups index with Python ints: a 0-d GPU index would sync the device once per site
    sample_of = [r.sample for r in chunk]
    src_row_of = [src_row(r.sample) for r in chunk]

    # Hook writes, per hook name: restores (from the source), then freezes (base values).
    restores: dict[str, list[tuple[int, int, Tensor]]] = defaultdict(list)
    freezes: dict[str, list[tuple[int, int, Tensor]]] = defaultdict(list)
    entry_writes: dict[int, list[tuple[int, Tensor]]] = defaultdict(list)  # row -> (pos, value)
    for k, r in enumerate(chunk):
        iv = interventions[r.intervention]
        for s in iv.restore:
            value = source.activation(s.component, s.layer)[src_row_of[k], s.position]
            if s.component in ("resid_pre", "resid_post") and _entry_index(s) == r.start_layer:
                entry_writes[k].append((s.position - t0, value))
            else:
                restores[_hook_name(s, n_layers)].append((k, s.position - t0, value))
        for s in iv.freeze:
            if _entry_index(s) <= r.start_layer and s.component in ("resid_pre", "resid_post"):
                continue  # at or below the start: already the base run's value
            if s.layer < r.start_layer or s.position < t0:
                continue
            value = base.activation(s.component, s.layer)[sample_of[k], s.position]
            freezes[_hook_name(s, n_layers)].append((k, s.position - t0, value))

    def as_hook(items):
        return restore_at(
            torch.stack([v for _, _, v in items]),
            [k for k, _, _ in items],
            [p for _, p, _ in items],
        )

    fwd_hooks = [(name, as_hook(items)) for name, items in restores.items()]
    fwd_hooks += [(name, as_hook(items)) for name, items in freezes.items()]

    # One group per start layer: the base run's residual there, restored boundary values written in.
    groups: list[RowGroup] = []
    lo = 0
    while lo < len(chunk):
        layer = chunk[lo].start_layer
        hi = lo
        while hi < len(chunk) and chunk[hi].start_layer == layer:
            hi += 1
        samples = torch.tensor(sample_of[lo:hi], device=base.resid.device)
        joining = base.resid[layer][samples, t0:]  # a copy (advanced indexing)
        for k in range(lo, hi):
            for p, v in entry_writes.get(k, []):
                joining[k - lo, p] = v
        groups.append(RowGroup(layer, joining, tuple(sample_of[lo:hi])))
        lo = hi
    resid = forward_rows(model, base, groups, t0, fwd_hooks)
    return final_logits(model, resid[:, read - t0])


# --------------------------------------------------------------------------------------------
# Patching between two prompts, like transformer_lens.patching.get_act_patch_*.


def _prompt_tokens(model, prompt) -> Tensor:
    from kvmem.core.tokenize import encode

    if isinstance(prompt, str):
        return torch.tensor(encode(model, prompt), dtype=torch.long)
    if isinstance(prompt, Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1:
            raise InvalidArgumentError("Pass one prompt: a string or token ids of shape [pos] or [1, pos].")
        return prompt.long()
    raise InvalidArgumentError(f"Expected a prompt string or a token tensor, got {type(prompt).__name__}.")


def patch_prompts(
    model,
    clean: str | Int[Tensor, "pos"] | Int[Tensor, "1 pos"],
    corrupted: str | Int[Tensor, "pos"] | Int[Tensor, "1 pos"],
    metric: Metric,
    *,
    component: str = "resid_pre",
    read_pos: int = -1,
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
    reuse_prefix: bool = True,
    progress: bool | None = None,
) -> Float[Tensor, "layer pos"]:
    """Activation patching from a clean prompt into a corrupted one, every (layer, position).

    Cell [l, p] is `metric(logits)` of the corrupted run with `component` of layer l at position
    p replaced by its clean value: the same numbers as `transformer_lens.patching`'s
    `get_act_patch_resid_pre` / `get_act_patch_mlp_out` / `get_act_patch_attn_out`, except that
    `metric` receives only the read position's logits `[rows, d_vocab]` (TransformerLens passes
    every position's). Strings are tokenized with `kvmem.core.tokenize` (start token included).
    `batch_size`, `memory_budget`, `reuse_prefix`: as in `run_interventions`; `progress`: a
    progress bar (None: `kvmem.config.PROGRESS`).
    """
    if component not in COMPONENTS:
        raise InvalidArgumentError(f"Unknown component {component!r}; use one of {', '.join(COMPONENTS)}.")
    clean_t, corrupt_t = _prompt_tokens(model, clean), _prompt_tokens(model, corrupted)
    if clean_t.shape != corrupt_t.shape:
        raise InvalidArgumentError(
            f"Clean ({clean_t.shape[0]} tokens) and corrupted ({corrupt_t.shape[0]} tokens) prompts "
            "must have the same token length."
        )
    source = record_run(model, clean_t)
    base = record_run(model, corrupt_t)
    n_layers, n_pos = model.cfg.n_layers, base.n_pos
    cells = [
        Intervention((Site(component, layer, pos),)) for layer in range(n_layers) for pos in range(n_pos)
    ]
    values = run_interventions(
        model, base, source, cells, metric, read_pos=read_pos, batch_size=batch_size,
        memory_budget=memory_budget, reuse_prefix=reuse_prefix,
        progress=config.show_progress(progress),
    )
    return values[:, 0].reshape(n_layers, n_pos)
