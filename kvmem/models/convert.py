"""Hugging Face model -> TransformerLens config and processed weights, without the hub.

The ``HookedTransformerConfig`` is built locally by TransformerLens's own
``get_pretrained_model_config``: Gemma's config is name-based in TransformerLens (the
``google/gemma-3-270m`` branch never fetches), so a Gemma-family model is matched to the official
name with the same shapes; every other architecture is read from the Hugging Face config, written
as ``config.json`` to a neutrally named temporary folder, so that TransformerLens's name-based
branches (which match substrings such as "llama" in the name) never fire. Weights go through
TransformerLens's ``get_pretrained_state_dict`` converters and ``ProcessWeights.process_weights``
(``fold_ln``, ``center_writing_weights``, ``center_unembed``, ``fold_value_biases``: the same
defaults as ``HookedTransformer.from_pretrained``). The config is kept as JSON, so that a converted
model can be cached and built again (`instantiate`) without processing anything twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from kvmem.errors import CacheError, InvalidArgumentError, UnknownModelError

# TransformerLens keeps the Gemma configs name-based only (no branch reads a Hugging Face config),
# so a local Gemma-family checkpoint is matched to the official name with the same shapes.
_NAME_BASED_ARCHITECTURES = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"}

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


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a dtype, its name ('bfloat16', 'torch.float16') or None (float32)."""
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


def drop_quantization(hf_model) -> None:
    """The GGUF tensors are dequantised to fp32 already; stop both libraries treating them as quantised."""
    config = hf_model.config
    if hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
    if "quantization_config" in getattr(config, "__dict__", {}):
        del config.__dict__["quantization_config"]
    hf_model.hf_quantizer = None


def architecture_of(hf_config) -> str:
    """The Hugging Face model class a config names (``architectures``, else its ``model_type``);
    `UnknownModelError` when it names neither."""
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


def convert_hf_model(hf_model, *, fold_ln: bool, center_writing_weights: bool, center_unembed: bool,
                     fold_value_biases: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The TransformerLens config (as JSON) and processed fp32 parameters of a Hugging Face model,
    made without the hub.

    Mirrors ``HookedTransformer.from_pretrained`` (the same config builder, weight converters and
    ``ProcessWeights.process_weights``, with the same overrides of flags that do not apply), with
    the config made locally. ``load_and_process_state_dict`` is not called because it loads the
    processed weights one key at a time, each a full ``load_state_dict`` walk (10 of the 14 s of a
    SmolLM2 conversion); `instantiate` loads them in one go.
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    from transformer_lens.weight_processing import ProcessWeights

    drop_quantization(hf_model)
    hf_model = hf_model.to(torch.float32)
    for p in hf_model.parameters():
        p.requires_grad_(False)
    hf_config = hf_model.config
    if not getattr(hf_config, "architectures", None):  # GGUF configs name none; the class does
        hf_config.architectures = [type(hf_model).__name__]
    architecture = architecture_of(hf_config)
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


def instantiate(cfg_json: dict[str, Any], params: dict[str, torch.Tensor], tokenizer, *, device,
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
