"""Hook factories: every intervention kvmem performs, as a plain TransformerLens hook.

Each factory returns a function `hook(activation, hook) -> activation` that works by itself in
`model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])` or `with model.hooks(fwd_hooks=...)`:

- `capture`        keep a hook point's activation in a dict (keyed by hook name or a given key)
- `add_noise`      seeded Gaussian noise on chosen positions of `hook_embed` (ROME's corruption)
- `restore`        write recorded (clean) values back at chosen rows x positions of a hook point
- `restore_at`     the same for an explicit list of (row, position) pairs, one value each
- `freeze`         hold a hook point at recorded values (severing a path, ROME fig. 3)
- `scale_neurons`  multiply chosen `hook_post` neurons (x0 suppress, x2 amplify)

`has_hook` / `check_has_embed_hook` say which hook points a model has; `add_mlp_output_hook` hooks
an MLP module's raw output (before a post-MLP norm), the one place no TransformerLens hook point sits.

Positions index the activation's `pos` axis as the model sees it (BOS included when the model
prepends one), exactly like `TokenizedFact.subject`. Hooks never modify their inputs' storage
other than the activation they are given, and never keep state between calls.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem.errors import InvalidArgumentError

Hook = Callable[[Tensor, object], Tensor]
Positions = Sequence[int] | range | Tensor | None
Rows = Sequence[int] | range | Tensor | None

EMBED_HOOK = "hook_embed"


def _index(values: Positions | Rows, what: str) -> Tensor | None:
    if values is None:
        return None
    if isinstance(values, Tensor):
        if values.dim() != 1 or values.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
            raise InvalidArgumentError(f"{what} must be a 1-d integer tensor or a list of ints.")
        return values.long().cpu()
    out = [int(v) for v in values]
    return torch.tensor(out, dtype=torch.long)


def _check_bounds(idx: Tensor | None, size: int, what: str) -> None:
    if idx is None or idx.numel() == 0:
        return
    if int(idx.max()) >= size or int(idx.min()) < -size:
        raise InvalidArgumentError(
            f"{what} {idx.tolist()} out of range for an activation with {size} {what}; "
            f"pass indices in [0, {size - 1}]."
        )


def capture(
    store: dict,
    key: object | None = None,
    *,
    clone: bool = False,
    append: bool = False,
) -> Hook:
    """Hook keeping the activation it sees in `store` and passing it on unchanged.

    Stored under `key`, or under the hook point's name when `key` is None (one factory serves a
    list of hook points: `[(name, capture(store)) for name in names]`; on a TransformerBridge that
    is the canonical name, e.g. `blocks.3.hook_in` for `blocks.3.hook_resid_pre`, so pass
    `key=name` to keep the name you registered). `append=True` keeps every
    call's activation in a list at that key (a hook point that fires once per batch). The
    activation is detached; `clone=True` also copies it, for callers that keep it while the model
    writes the same storage again (in-place ops downstream).
    """

    def hook(activation: Tensor, hook=None) -> Tensor:
        k = key if key is not None else getattr(hook, "name", None)
        if k is None:
            raise InvalidArgumentError("capture(store) without a key needs the hook point's name; pass key=...")
        value = activation.detach()
        if clone:
            value = value.clone()
        if append:
            store.setdefault(k, []).append(value)
        else:
            store[k] = value
        return activation

    return hook


def gaussian_noise(
    n_rows: int,
    n_positions: int,
    d_model: int,
    scale: float,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Float[Tensor, "row pos d_model"]:
    """`scale` x standard normal draws from a CPU `torch.Generator` seeded with `seed`.

    Drawn on the CPU and then moved, so the same seed gives the same noise on any device.
    Row r of a larger draw equals row r of a smaller one (rows are drawn in order).
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn((n_rows, n_positions, d_model), generator=gen, dtype=torch.float32)
    return (noise * float(scale)).to(device=device, dtype=dtype)


def add_noise(
    positions: Positions,
    scale: float,
    seed: int = 0,
    rows: Rows = None,
) -> Hook:
    """Hook for `hook_embed`: add `scale` x N(0, 1) noise at `positions` of every row in `rows`.

    ROME corrupts only the token embeddings (not the positional ones), so use it on `hook_embed`.
    Row i of `rows` (default: every row of the batch) gets noise row i of
    `gaussian_noise(len(rows), len(positions), d_model, scale, seed)`: running the same batch twice
    adds the same noise, and a batch of n corrupted rows is n independent noise samples.
    """
    pos = _index(positions, "positions")
    row_idx = _index(rows, "rows")
    if pos is None or pos.numel() == 0:
        raise InvalidArgumentError("add_noise needs at least one position to corrupt (e.g. the subject span).")
    if not isinstance(scale, (int, float)) or scale < 0:
        raise InvalidArgumentError(f"Noise scale must be a non-negative float, got {scale!r}.")

    def hook(activation: Tensor, hook=None) -> Tensor:
        batch, n_pos, d_model = activation.shape[0], activation.shape[1], activation.shape[-1]
        _check_bounds(pos, n_pos, "positions")
        _check_bounds(row_idx, batch, "rows")
        r = torch.arange(batch) if row_idx is None else row_idx
        noise = gaussian_noise(len(r), len(pos), d_model, scale, seed, activation.dtype, activation.device)
        out = activation.clone()
        rr = r.to(activation.device)[:, None]
        pp = pos.to(activation.device)[None, :]
        out[rr, pp] = out[rr, pp] + noise
        return out

    return hook


def restore(clean: Tensor, positions: Positions = None, rows: Rows = None) -> Hook:
    """Hook writing `clean` back at `positions` (default all) of `rows` (default all).

    `clean` is the recorded activation of the same hook point, shaped like the activation
    (`[batch, pos, ...]`) or with a batch of 1 (`[1, pos, ...]` or `[pos, ...]`), broadcast to
    every row: `restore(clean_cache["blocks.3.hook_mlp_out"], positions=[4])`.
    """
    pos = _index(positions, "positions")
    row_idx = _index(rows, "rows")

    def hook(activation: Tensor, hook=None) -> Tensor:
        src = clean.to(device=activation.device, dtype=activation.dtype)
        if src.dim() == activation.dim() - 1:
            src = src[None]
        if src.dim() != activation.dim() or src.shape[2:] != activation.shape[2:] or src.shape[0] not in (
            1,
            activation.shape[0],
        ):
            raise InvalidArgumentError(
                f"restore: recorded values of shape {tuple(clean.shape)} do not fit the activation "
                f"{tuple(activation.shape)}; record the same hook point on a prompt of the same length."
            )
        batch, n_pos = activation.shape[0], activation.shape[1]
        p = torch.arange(n_pos) if pos is None else pos
        r = torch.arange(batch) if row_idx is None else row_idx
        _check_bounds(p, min(n_pos, src.shape[1]), "positions")
        _check_bounds(r, batch, "rows")
        out = activation.clone()
        rr = r.to(activation.device)[:, None]
        pp = p.to(activation.device)[None, :]
        src_rows = rr if src.shape[0] == batch else torch.zeros_like(rr)
        out[rr, pp] = src[src_rows, pp]
        return out

    return hook


def freeze(recorded: Tensor, positions: Positions = None, rows: Rows = None) -> Hook:
    """Hook holding a hook point at `recorded` values (e.g. the corrupted run's MLP output).

    Used to sever a path: with an MLP frozen at its corrupted values, a restored state can no
    longer act through that MLP. Same shapes and broadcasting as `restore`.
    """
    return restore(recorded, positions, rows)


def restore_at(
    values: Tensor,
    rows: Sequence[int] | Tensor,
    positions: Sequence[int] | Tensor,
) -> Hook:
    """Hook setting `activation[rows[i], positions[i]] = values[i]` for each i.

    The scatter form of `restore`, for batches where each row restores a different position.
    """
    r = _index(rows, "rows")
    p = _index(positions, "positions")
    if r is None or p is None or len(r) != len(p) or values.shape[0] != len(r):
        raise InvalidArgumentError("restore_at needs rows, positions and values of the same length.")

    def hook(activation: Tensor, hook=None) -> Tensor:
        _check_bounds(r, activation.shape[0], "rows")
        _check_bounds(p, activation.shape[1], "positions")
        out = activation.clone()
        out[r.to(activation.device), p.to(activation.device)] = values.to(
            device=activation.device, dtype=activation.dtype
        )
        return out

    return hook


def scale_neurons(
    positions: Positions,
    neurons: Sequence[int] | Tensor,
    factor: float,
    rows: Rows = None,
) -> Hook:
    """Hook for `blocks.{l}.mlp.hook_post`: multiply `neurons` at `positions` (None: all) by `factor`.

    `factor=0` suppresses the neurons, `factor=2` amplifies them. `rows` restricts it to some
    batch rows (default all), so one batch can hold scaled and unscaled prompts.
    """
    pos = _index(positions, "positions")
    row_idx = _index(rows, "rows")
    neu = _index(neurons, "neurons")
    if neu is None or neu.numel() == 0:
        raise InvalidArgumentError("scale_neurons needs at least one neuron index.")
    if not isinstance(factor, (int, float)):
        raise InvalidArgumentError(f"factor must be a number (0 suppresses, 2 amplifies), got {factor!r}.")

    def hook(activation: Tensor, hook=None) -> Tensor:
        batch, n_pos, width = activation.shape[0], activation.shape[1], activation.shape[-1]
        _check_bounds(neu, width, "neurons")
        p = torch.arange(n_pos) if pos is None else pos
        r = torch.arange(batch) if row_idx is None else row_idx
        _check_bounds(p, n_pos, "positions")
        _check_bounds(r, batch, "rows")
        dev = activation.device
        rr, pp, nn = r.to(dev)[:, None, None], p.to(dev)[None, :, None], neu.to(dev)[None, None, :]
        out = activation.clone()
        out[rr, pp, nn] = out[rr, pp, nn] * factor
        return out

    return hook


def has_hook(model, name: str) -> bool:
    """Whether the model has the hook point `name` (e.g. no `hook_mlp_out` on attention-only models)."""
    return name in getattr(model, "hook_dict", {})


def check_has_embed_hook(model) -> None:
    """Raise unless the model exposes `hook_embed` (token embeddings without positions)."""
    if not has_hook(model, EMBED_HOOK):
        raise InvalidArgumentError(
            "This model has no 'hook_embed' hook point, so its token embeddings cannot be corrupted; "
            "use a transformer_lens.HookedTransformer."
        )


def add_mlp_output_hook(model, layer: int, fn: Callable[[Tensor], Tensor]):
    """Register `fn(output) -> output` on layer `layer`'s MLP module itself and return the handle
    (call `.remove()`). `fn` sees the MLP's own output, `post @ W_out + b_out`, before any post-MLP
    norm (Gemma-2/3's `ln2_post`); `hook_mlp_out` sees it after that norm. ROME's v* optimisation
    adds its δ here, where the edited `W_out` writes."""
    return model.blocks[layer].mlp.register_forward_hook(lambda module, inputs, output: fn(output))
