"""Geva et al. (2021): MLP layers as key-value memories.

- `value_tokens`: values -> vocabulary (top promoted / demoted tokens of every value vector)
- `top_contexts`, `top_contexts_by_layer`: keys -> top-triggering corpus prefixes (streaming)
- `key_value_agreement`: value's top token vs the next token of its key's top trigger
- `composition_stats`: active memories, compositional outputs, residual refinement by layer
- `fact_memories`: the memories that push a fact's answer, by layer, at the subject and last token
- `memory_coefficients`: a layer's key coefficients on given tokens (`hook_post`)
"""

from kvmem.memories.agreement import Agreement, key_value_agreement
from kvmem.memories.composition import Composition, composition_stats
from kvmem.memories.contexts import TopContexts, corpus_windows, top_contexts, top_contexts_by_layer
from kvmem.memories.fact_view import FactMemories, fact_memories
from kvmem.memories.values import ValueTokens, value_tokens
from kvmem.memories.coefficients import memory_coefficients, memory_sum
from kvmem.memories.views import OfflineHTML

__all__ = [
    "Agreement",
    "Composition",
    "FactMemories",
    "OfflineHTML",
    "TopContexts",
    "ValueTokens",
    "composition_stats",
    "corpus_windows",
    "fact_memories",
    "key_value_agreement",
    "memory_coefficients",
    "memory_sum",
    "top_contexts",
    "top_contexts_by_layer",
    "value_tokens",
]
