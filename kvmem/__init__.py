"""kvmem: MLP layers as key-value memories of facts, for TransformerLens.

    import kvmem
    model = kvmem.load_model("factworld")            # or "gemma-3-270m", "smollm2-135m", a folder
    fact = kvmem.Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", target_true="Paris")
    kvmem.trace_all(model, fact).plot()               # causal tracing (ROME's windows by default)
    kvmem.four_views(model, fact)                     # tracing, neurons, memories and a ROME edit

Models: a TransformerBridge (TransformerLens >= 4.3, compatibility mode) or a HookedTransformer
(TransformerLens 3.9); `load_model` returns the installed version's kind.

Layers, imports only downward: kvmem.errors / kvmem.config <- kvmem.core (facts, tokenize, hooks,
engine, weights, readout, backend, bridge: the only code touching TransformerLens internals) <- the analyses
(tracing, neurons, memories, editing, evaluation, recall) <- kvmem.pipelines (diagnose, stress,
four_views) <- kvmem.cli and kvmem.viz.report. kvmem.models, kvmem.data and kvmem.factworld load
models and data beside the core.
"""

from kvmem.errors import KvmemError, UnknownFactError
from kvmem.core.facts import Fact, tokenize_fact
from kvmem.models import load_model
from kvmem.recall import fact_recall
from kvmem.tracing import (attribution_trace, average_indirect_effect, causal_trace, noise_level, screened_trace,
                           trace_all)
from kvmem.neurons import integrated_gradients, knowledge_neurons, neuron_effect
from kvmem.memories import (
    composition_stats,
    fact_memories,
    key_value_agreement,
    top_contexts,
    top_contexts_by_layer,
    value_tokens,
)
from kvmem.editing import Edit, RomeHparams, apply_edit, compute_rome_edit, edited, second_moment
from kvmem.editing.interference import Interference, KeyBank, predict_interference
from kvmem.editing import EditSession, MultiLayerEdit, compute_memit_edit, load_edit
from kvmem.evaluation import evaluate_counterfact
from kvmem.data import CounterFactRecord
from kvmem.pipelines.diagnose import Localization, diagnose
from kvmem.pipelines.stress import StressResult, stress_edits
from kvmem.pipelines.four_views import FactReport, four_views

__version__ = "0.1.0"

__all__ = [
    "KvmemError",
    "Fact",
    "tokenize_fact",
    "load_model",
    "fact_recall",
    "causal_trace",
    "trace_all",
    "attribution_trace",
    "screened_trace",
    "average_indirect_effect",
    "noise_level",
    "integrated_gradients",
    "knowledge_neurons",
    "neuron_effect",
    "value_tokens",
    "top_contexts",
    "top_contexts_by_layer",
    "key_value_agreement",
    "composition_stats",
    "fact_memories",
    "Edit",
    "RomeHparams",
    "compute_rome_edit",
    "compute_memit_edit",
    "EditSession",
    "MultiLayerEdit",
    "load_edit",
    "apply_edit",
    "edited",
    "second_moment",
    "predict_interference",
    "Interference",
    "KeyBank",
    "evaluate_counterfact",
    "CounterFactRecord",
    "four_views",
    "FactReport",
    "diagnose",
    "Localization",
    "UnknownFactError",
    "stress_edits",
    "StressResult",
]
