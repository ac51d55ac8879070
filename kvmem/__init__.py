"""kvmem: MLP layers as key-value memories of facts, for TransformerLens."""

from kvmem.errors import KvmemError
from kvmem.prompts import Fact

__all__ = ["KvmemError", "Fact"]
