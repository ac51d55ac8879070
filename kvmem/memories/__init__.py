"""Geva et al. (2021): MLP layers as key-value memories.

- `value_tokens`: values -> vocabulary (top promoted / demoted tokens of every value vector)
- `top_contexts`, `top_contexts_by_layer`: keys -> top-triggering corpus prefixes (streaming
  over `corpus_windows`, the corpus as fixed-length windows)
- `key_value_agreement`: value's top token vs the next token of its key's top trigger
- `composition_stats`: active memories, compositional outputs, residual refinement by layer
- `fact_memories`: the memories that push a fact's answer, by layer, at the subject and last token
- `memory_coefficients`: a layer's key coefficients on given tokens (`hook_post`)
- `value_directions`, `readout_logits`: what a value writes, and how it reads through the unembedding

Views (`show()`) return `kvmem.viz.HTMLView`; figures follow `plot(ax=None, *, title=None)`.
"""

from kvmem.memories.agreement import Agreement, key_value_agreement
from kvmem.memories.composition import Composition, composition_stats
from kvmem.memories.contexts import TopContexts, top_contexts, top_contexts_by_layer
from kvmem.memories.windows import corpus_windows
from kvmem.memories.fact_view import FactMemories, fact_memories
from kvmem.memories.values import ValueTokens, value_tokens
from kvmem.memories.coefficients import memory_coefficients, memory_sum
from kvmem.memories._common import readout_logits, value_directions

__all__ = [
    "Agreement",
    "Composition",
    "FactMemories",
    "TopContexts",
    "ValueTokens",
    "composition_stats",
    "corpus_windows",
    "fact_memories",
    "key_value_agreement",
    "memory_coefficients",
    "memory_sum",
    "readout_logits",
    "top_contexts",
    "top_contexts_by_layer",
    "value_directions",
    "value_tokens",
]
