"""Causal tracing (Meng et al., ROME, 2022): where in the network a fact is recalled.

Run the fact's prompt clean; run it `samples` times with Gaussian noise on the subject tokens'
embeddings; then restore one clean state inside the corrupted runs and measure how much of the
clean answer's probability comes back. `causal_trace` does one kind of state for one fact,
`trace_all` the three kinds together, `average_indirect_effect` averages many facts in ROME's
six token buckets.

- `trace.py`: one fact (preparation, the restoration grid, `causal_trace`, `trace_all`, `noise_level`);
- `average.py`: many facts (token buckets, per-fact run-log records, `average_indirect_effect`);
- `attribution.py`: the same grids estimated from gradients (attribution patching, AtP*,
  integrated gradients), `attribution_trace` / `attribution_trace_all`;
- `screened.py`: `screened_trace`, exact cells only where such an estimate ranks a column highest;
- `results.py`: `CausalTrace`, `TraceSet`, `AverageEffect`; `plots.py`: their figures and views.

ROME conventions kept here (checked against ROME's `experiments/causal_trace.py`):
- "resid" restores the output of block l (`hook_resid_post`), one layer at a time.
- "mlp"/"attn" restore the MLP / attention output of the layers `[l - w//2, l + w - w//2)`
  clipped to the model, at one token (`window=10` in ROME's figures; the default here is
  `kvmem.config.trace_window`: 10, or half the model on models of fewer than 10 layers).
- the answer is the clean run's top token (the target's first token when the fact has one);
  scores are its probability, averaged over the noise samples; every cell sees the same samples.
- noise = 3 x the standard deviation of the subject tokens' embeddings (`noise_level`).
- severed tracing (ROME fig. 3 / appendix): restore the residual at (l, t) while the MLP (or
  attention) outputs at token t are held at their corrupted values in every layer.
"""

from kvmem.tracing.results import AverageEffect, CausalTrace, TraceSet
from kvmem.tracing.trace import (
    COMPONENT_OF_KIND,
    KINDS,
    Kind,
    PreparedFact,
    answer_probability,
    causal_trace,
    kind_windows,
    noise_level,
    prepare_fact,
    trace_all,
    trace_interventions,
    trace_prepared,
    window_layers,
)
from kvmem.tracing.average import (
    BUCKETS,
    average_indirect_effect,
    average_records,
    fact_key,
    fact_record,
    token_buckets,
)
from kvmem.tracing.attribution import METHODS, attribution_trace, attribution_trace_all
from kvmem.tracing.screened import screened_trace
from kvmem.tracing.plots import plot_average_effect, plot_trace, plot_traces, show_traces

__all__ = [
    "AverageEffect",
    "BUCKETS",
    "METHODS",
    "COMPONENT_OF_KIND",
    "CausalTrace",
    "KINDS",
    "Kind",
    "PreparedFact",
    "TraceSet",
    "answer_probability",
    "attribution_trace",
    "attribution_trace_all",
    "screened_trace",
    "average_indirect_effect",
    "average_records",
    "causal_trace",
    "fact_key",
    "fact_record",
    "kind_windows",
    "noise_level",
    "plot_average_effect",
    "plot_trace",
    "plot_traces",
    "prepare_fact",
    "show_traces",
    "token_buckets",
    "trace_all",
    "trace_interventions",
    "trace_prepared",
    "window_layers",
]
