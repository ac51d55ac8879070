"""The batched intervention engine that causal tracing (and attribution) share.

Vocabulary: a *base* run is the run we intervene in (the noise-corrupted prompt, one row per
noise sample, or a corrupted second prompt); a *source* run supplies the values we restore (the
clean prompt). `record_run` runs a prompt once and keeps everything the engine needs: the
residual stream entering every layer, every MLP and attention output, and every layer's
attention keys/values. `run_interventions` then evaluates many `Intervention`s (sets of sites
restored from the source, optionally others frozen at base values) for every base row at once.

What is recomputed. A restoration at (layer l, position t) leaves every state below l and
every state before t equal to the base run, so a row for it:

- starts at layer l from the base run's recorded residual (nothing below l is recomputed;
  a restored residual at the boundary is written straight into that starting residual);
- runs only positions t..end, attending to the base run's recorded keys/values for positions
  before t (TransformerLens's key/value-cache path, so rotary offsets, grouped-query attention
  and local attention windows are handled by the model itself; `reuse_prefix=False` turns this off);
- unembeds only the one position that is read (final norm + `x @ W_U`, no `W_U.T` copy);
- is not run at all when it cannot change the readout: the read position is before t, or every
  restored value equals the base value already there (e.g. tokens before a corrupted subject).

Rows sharing a start position are stacked along the batch dimension; within such a group rows
are sorted by start layer and join the batch at their layer, so every block runs once per
group with exactly the rows that need it. Groups are cut into chunks of at most `max_batch`
rows (default: as many as fit `memory_budget` bytes).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvmem.errors import InvalidArgumentError, LayerOutOfRangeError
from kvmem.core.hooks import restore_at
from kvmem.core.readout import final_logits

Component = Literal["resid_pre", "resid_post", "mlp_out", "attn_out"]
COMPONENTS: tuple[str, ...] = ("resid_pre", "resid_post", "mlp_out", "attn_out")
Metric = Callable[[Tensor], Tensor]

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of activations per chunk


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


def _has_hook(model, name: str) -> bool:
    return name in getattr(model, "hook_dict", {})


@torch.no_grad()
def record_run(
    model,
    tokens: Int[Tensor, "pos"] | Int[Tensor, "row pos"],
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    n_rows: int | None = None,
) -> RecordedRun:
    """Run `tokens` once (with `fwd_hooks`, e.g. `add_noise` on `hook_embed`) and record it.

    1-d `tokens` are repeated `n_rows` times (default 1): a noise-corrupted base run is one row
    per noise sample. Rows must be unpadded prompts of one length.
    """
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    if tokens.dim() == 1:
        tokens = tokens[None].expand(n_rows or 1, -1)
    elif n_rows is not None and n_rows != tokens.shape[0]:
        raise InvalidArgumentError(f"n_rows={n_rows} but tokens has {tokens.shape[0]} rows.")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise InvalidArgumentError(
            f"{tokens.shape[1]} tokens exceed the model's context of {model.cfg.n_ctx}; shorten the prompt."
        )
    n_layers = model.cfg.n_layers
    has_mlp = all(_has_hook(model, f"blocks.{i}.hook_mlp_out") for i in range(n_layers))
    has_attn = all(_has_hook(model, f"blocks.{i}.hook_attn_out") for i in range(n_layers))
    mlp_out: list[Tensor | None] = [None] * n_layers
    attn_out: list[Tensor | None] = [None] * n_layers

    def keeper(store: list, i: int):
        def hook(activation: Tensor, hook=None) -> Tensor:
            store[i] = activation.detach().clone()
            return activation

        return hook

    capture = []
    for i in range(n_layers):
        if has_mlp:
            capture.append((f"blocks.{i}.hook_mlp_out", keeper(mlp_out, i)))
        if has_attn:
            capture.append((f"blocks.{i}.hook_attn_out", keeper(attn_out, i)))
    device = model.cfg.device
    tokens = tokens.to(device)
    batch = tokens.shape[0]
    with model.hooks(fwd_hooks=list(fwd_hooks) + capture):
        # No padding: the attention mask is all ones, so it is left out (as in a plain forward).
        resid, _, shortformer, _ = model.input_to_embed(tokens)
        resids = [resid]
        entries = [
            TransformerLensKeyValueCacheEntry.init_cache_entry(model.cfg, resid.device, batch)
            for _ in range(n_layers)
        ]
        for i, block in enumerate(model.blocks):
            resid = block(resid, past_kv_cache_entry=entries[i], shortformer_pos_embed=shortformer)
            resids.append(resid)
    return RecordedRun(
        tokens=tokens[0].detach().cpu(),
        resid=torch.stack(resids),
        mlp_out=torch.stack(mlp_out) if has_mlp else None,
        attn_out=torch.stack(attn_out) if has_attn else None,
        keys=tuple(e.past_keys for e in entries),
        values=tuple(e.past_values for e in entries),
        shortformer_pos_embed=shortformer,
    )


def rows_for_budget(model, n_pos: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """How many rows of `n_pos` tokens one chunk may hold within `memory_budget` bytes."""
    cfg = model.cfg
    item = torch.empty((), dtype=cfg.dtype).element_size()
    d_mlp = cfg.d_mlp or 0
    per_row = item * (
        n_pos * (6 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * n_pos + 4 * cfg.n_heads * cfg.d_head)
        + 5 * cfg.d_vocab  # logits and the temporaries of the bias add, the metric's softmax (measured: bench_tracing_memory)
    )
    return max(1, min(8192, int(memory_budget // max(per_row, 1))))


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
    read_pos: int = -1,
    max_batch: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    reuse_prefix: bool = True,
    progress: bool = False,
) -> Float[Tensor, "intervention row"]:
    """`metric(logits at read_pos)` for every intervention applied to every base row.

    `metric` maps next-token logits `[rows, d_vocab]` to one number per row `[rows]` (e.g. the
    answer's probability). Returns `[len(interventions), base.n_rows]`.
    """
    _validate(model, base, source, interventions)
    n_layers, n_pos, n_base = model.cfg.n_layers, base.n_pos, base.n_rows
    read = read_pos % n_pos
    base_values = metric(base.final_logits(model, read)).float()
    out = base_values[None, :].repeat(len(interventions), 1)
    if max_batch is not None and max_batch < 1:
        raise InvalidArgumentError(f"max_batch must be at least 1, got {max_batch}.")

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
        limit = max_batch or rows_for_budget(model, n_pos - t0, memory_budget)
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
    """Logits at `read` for the rows of one chunk (all with the same start position)."""
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    n_layers = model.cfg.n_layers
    t0 = chunk[0].start_pos
    first_layer = chunk[0].start_layer
    samples = torch.tensor([r.sample for r in chunk], device=base.resid.device)
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

    starts = [r.start_layer for r in chunk]
    shortformer = base.shortformer_pos_embed
    resid = base.resid.new_zeros((0, base.n_pos - t0, base.resid.shape[-1]))
    with model.hooks(fwd_hooks=fwd_hooks):
        for layer in range(first_layer, n_layers + 1):
            lo, hi = resid.shape[0], sum(1 for s in starts if s <= layer)
            if hi > lo:  # rows starting here join the batch with the base run's residual
                joining = base.resid[layer][samples[lo:hi], t0:].clone()
                for k in range(lo, hi):
                    for p, v in entry_writes.get(k, []):
                        joining[k - lo, p] = v
                resid = torch.cat([resid, joining]) if lo else joining
            if layer == n_layers:
                break
            entry = None
            if t0 > 0:
                idx = samples[: resid.shape[0]]
                entry = TransformerLensKeyValueCacheEntry(
                    past_keys=base.keys[layer][idx, :t0],
                    past_values=base.values[layer][idx, :t0],
                    frozen=True,
                )
            sf = None
            if shortformer is not None:
                sf = shortformer[:1, t0:].expand(resid.shape[0], -1, -1)
            resid = model.blocks[layer](resid, past_kv_cache_entry=entry, shortformer_pos_embed=sf)
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
    component: str = "resid_pre",
    read_pos: int = -1,
    max_batch: int | None = None,
    reuse_prefix: bool = True,
    progress: bool = False,
) -> Float[Tensor, "layer pos"]:
    """Activation patching from a clean prompt into a corrupted one, every (layer, position).

    Cell [l, p] is `metric(logits)` of the corrupted run with `component` of layer l at position
    p replaced by its clean value: the same numbers as `transformer_lens.patching`'s
    `get_act_patch_resid_pre` / `get_act_patch_mlp_out` / `get_act_patch_attn_out`, except that
    `metric` receives only the read position's logits `[rows, d_vocab]` (TransformerLens passes
    every position's). Strings are tokenized with `kvmem.core.tokenize` (start token included).
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
        model, base, source, cells, metric, read_pos=read_pos, max_batch=max_batch,
        reuse_prefix=reuse_prefix, progress=progress,
    )
    return values[:, 0].reshape(n_layers, n_pos)
