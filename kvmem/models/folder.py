"""Any local Hugging Face causal-LM folder as a `HookedTransformer` or (TransformerLens 4) a
`TransformerBridge`, offline (nothing cached)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kvmem.errors import InvalidArgumentError, UnknownModelError
from kvmem.models.convert import architecture_of, convert_hf_model, instantiate, resolve_dtype

def load_hf_folder(path: str | os.PathLike, device: str | torch.device | None = None,
                   dtype: torch.dtype | str | None = None, *, tokenizer=None, fold_ln: bool = True,
                   center_writing_weights: bool = True, center_unembed: bool = True,
                   fold_value_biases: bool = True, n_ctx: int | None = None,
                   default_prepend_bos: bool | None = None, backend: str | None = None):
    """A local Hugging Face causal-LM folder (``config.json`` + weights) as a HookedTransformer, or
    a TransformerBridge in compatibility mode (`backend`, default the installed TransformerLens's),
    offline.

    Any architecture TransformerLens converts, read from ``config.json`` (``architectures`` /
    ``model_type``); the TransformerLens config is built from that local config, never fetched.
    The folder's tokenizer is used when it has one (else pass ``tokenizer``). ``dtype=None`` means
    float32 (TransformerLens's weight processing wants full precision); the weights are processed
    in fp32 and then cast. Nothing is cached: loading a folder takes seconds. On the bridge the
    folder's name is given to ``boot_transformers`` (`kvmem.models.bridge.boot_bridge`); ``n_ctx``
    and ``default_prepend_bos`` apply to a HookedTransformer only.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kvmem.models.registry import resolve_backend

    backend = resolve_backend(backend)
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise UnknownModelError(f"{folder} is not a Hugging Face model folder (no config.json there).")
    dtype = resolve_dtype(dtype)
    try:
        hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise UnknownModelError(f"{folder}/config.json cannot be read by transformers ({e}).") from None
    architecture_of(hf_config)  # a clear error before loading weights
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
    if backend == "bridge":
        if n_ctx is not None or default_prepend_bos is not None:
            raise InvalidArgumentError("n_ctx and default_prepend_bos apply to a HookedTransformer only "
                                       "(backend='hooked').")
        from kvmem.models.bridge import boot_bridge

        return boot_bridge(hf_model, tokenizer, boot_name=str(folder.resolve()),
                           model_name=folder.resolve().name, device=device, dtype=dtype,
                           compat=dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                       center_unembed=center_unembed, fold_value_biases=fold_value_biases))
    if tokenizer is not None and tokenizer.bos_token is not None and not tokenizer.init_kwargs.get("add_bos_token"):
        # TransformerLens would otherwise re-create the tokenizer from name_or_path with
        # add_bos_token=True; that works offline for a local folder, but keep the one given.
        # kvmem.core.tokenize and model.to_tokens add the start token themselves when asked to.
        tokenizer.init_kwargs["add_bos_token"] = True
    cfg_json, params = convert_hf_model(hf_model, fold_ln=fold_ln,
                                        center_writing_weights=center_writing_weights,
                                        center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    del hf_model
    cfg_json["model_name"] = folder.resolve().name
    if default_prepend_bos is not None:
        cfg_json["default_prepend_bos"] = bool(default_prepend_bos)
    return instantiate(cfg_json, params, tokenizer, device=device, dtype=dtype, n_ctx=n_ctx,
                       tokenizer_dir=str(folder) if tokenizer is not None else None)
