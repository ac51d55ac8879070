"""kvmem's defaults, each defined once and read from here by Python, the CLI, benchmarks and notebooks.

- `cache_root`: where converted models, factworld's expanded checkpoint and second-moment
  statistics are cached (`$KVMEM_CACHE`, else `~/.cache/kvmem`).
- `DEFAULT_MEMORY_BUDGET`: bytes of activations one batched pass of the intervention engine or of
  integrated gradients may hold; batches are sized to fit it.
- Causal-tracing windows: `trace_window` (ROME's figures) and `localization_window` (the
  diagnostic), with the reason for each.
- `STATS_TOKENS`: how many keys ROME's second-moment statistics average over by default.
- `PROGRESS`: whether long work shows a tqdm bar when a caller does not say (`progress=None`,
  resolved by `show_progress`).
- `PREDICTED_TOP_K`, `PREDICTED_MIN_P`: when a model counts as predicting a fact's target
  (`predicts`); analyses of a fact it does not predict warn (`kvmem.errors.UnpredictedFactWarning`).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of activations per batched pass

# ROME's reference code collects C = E[k kᵀ] over 100,000 Wikipedia documents; 200,000 tokens of
# ordinary text keep it invertible on the shipped models and take minutes on a 2-core CPU
# (`SecondMoment.convergence` shows how far it has settled).
STATS_TOKENS = 200_000

PROGRESS = True

# ROME (Meng et al. 2022) restores MLP or attention outputs over a window of 10 consecutive layers
# around the centre layer (GPT-2 XL, 48 layers): a single layer's MLP changes little by itself.
ROME_WINDOW = 10


# A fact the model does not predict says little about how the model recalls it: causal tracing
# then measures the restoration of a probability near zero (ROME and Dai et al. study facts the
# model answers). Top-1 (ROME's `correct`) is too strict for small models, whose answer is often
# second or third behind a generic token ("the"); so the rule asks for the target's first token in
# the top 5 next tokens (the top-5 of `kvmem.fact_recall`) with a probability of at least 1%: below
# that, the indirect effects of tracing are differences of tiny numbers (Gemma-3-270m gives
# " Rio" of "Rio de Janeiro" 8e-9).
PREDICTED_TOP_K = 5
PREDICTED_MIN_P = 0.01


def predicts(rank: int, p: float) -> bool:
    """Whether a model predicts a target whose first token is its `rank`-th next token (0: the
    top token) with probability `p`: within the top `PREDICTED_TOP_K` and `p >= PREDICTED_MIN_P`."""
    return rank < PREDICTED_TOP_K and p >= PREDICTED_MIN_P


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else `$KVMEM_CACHE`, else `~/.cache/kvmem`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("KVMEM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvmem"


def show_progress(progress: bool | None) -> bool:
    """A `progress` argument resolved: as given, or `PROGRESS` when None (read at call time)."""
    return PROGRESS if progress is None else bool(progress)


def trace_window(n_layers: int) -> int:
    """The MLP/attention window of ROME's figures: 10 layers, or half the model when it has fewer
    than 10 (a window as deep as the model would restore every layer at once and show nothing).
    Gemma-3-270m (18 layers): 10; factworld (4 layers): 2."""
    return ROME_WINDOW if n_layers >= ROME_WINDOW else max(1, n_layers // 2)


def localization_window(n_layers: int) -> int:
    """The diagnostic's window: ROME's 10 of GPT-2 XL's 48 layers scaled to the model's depth (at
    least 2, at most the model), so that a window covers the same share of the network on every
    model and its peak can be compared with single-layer restorations. Gemma-3-270m: 4; factworld: 2."""
    return max(1, min(n_layers, max(2, round(n_layers * ROME_WINDOW / 48))))


def default_window(kind: str, n_layers: int) -> int:
    """`causal_trace`'s window when none is given: 1 for the residual stream (one state restores
    everything above it), `trace_window` for MLP and attention outputs."""
    return 1 if kind == "resid" else trace_window(n_layers)
