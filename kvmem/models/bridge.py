"""TransformerLens 4: a Hugging Face model already in memory as a `TransformerBridge` ready for kvmem.

Every offline path of `kvmem.load_model` on TransformerLens >= 4 (factworld, the GGUF models, local
Hugging Face folders) ends here, so the bridge is built one way:

1. ``TransformerBridge.boot_transformers(boot_name, hf_model=hf, tokenizer=tok)``: the model and
   tokenizer given are used as they are (nothing is fetched; ``HF_HUB_OFFLINE=1`` works);
2. ``enable_compatibility_mode()``: LayerNorm folded, writing weights and the unembedding centred,
   value biases folded, as ``HookedTransformer.from_pretrained`` does, in fp32; legacy hook names;
3. eval mode, then the requested device and dtype;
4. checks: ``to_tokens`` prepends the model's start token (`kvmem.models.specs.START_TOKENS`), and
   the tokenizer's known answer (`OfflineModelSpec.tokenizer_probe`) holds on the bridge too.

``boot_name`` is what TransformerLens records and looks its architecture defaults up by: the
Hugging Face repository for the real models ("google/gemma-3-270m": the short TransformerLens alias
would print a deprecation warning), ``cfg.model_name`` is then set to kvmem's key ("gemma-3-270m",
"factworld"), which kvmem's per-model presets (ROME's edit layer) read, as on a HookedTransformer.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from kvmem.errors import DependencyVersionError, InvalidArgumentError, MissingDependencyError


def _bridge_class():
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        import importlib.metadata

        try:
            have = importlib.metadata.version("transformer-lens")
        except importlib.metadata.PackageNotFoundError:
            have = None
        raise MissingDependencyError(
            f"A TransformerBridge needs TransformerLens >= 4.3 (installed: {have or 'none'}): "
            "pip install 'transformer-lens>=4.3', or use backend='hooked' with TransformerLens 3.9."
        ) from None
    return TransformerBridge


@contextlib.contextmanager
def _quiet_transformer_lens():
    """TransformerLens logs through `logging` at WARNING while booting (e.g. about eager attention);
    kvmem has checked these models, so only errors get through while it builds them."""
    logger = logging.getLogger("transformer_lens")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def default_device() -> torch.device:
    """The device TransformerLens picks when none is given (CUDA when available, as for a
    HookedTransformer)."""
    try:
        from transformer_lens.utilities import get_device
    except ImportError:  # pragma: no cover - moved
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(get_device())


def check_start_token(model, start_token: str | None = None, probe: tuple[str, tuple[int, ...]] = ("", ())) -> None:
    """`DependencyVersionError` unless ``model.to_tokens(text)`` puts the start token first (the
    tokenizer's BOS, or `start_token`) and, with a `probe` (text, ids with the start token), gives
    exactly those ids: what the HookedTransformer gives, so both backends see the same tokens."""
    tok = model.tokenizer
    if tok is None:
        return
    want = start_token if start_token is not None else tok.bos_token
    if want is None:
        return
    want_id = tok.convert_tokens_to_ids(want)
    tokens = model.to_tokens("The capital")
    if int(tokens[0, 0]) != want_id or (tokens[0] == want_id).sum() != 1:
        raise DependencyVersionError(
            f"model.to_tokens('The capital') gives {tokens[0].tolist()}, not the start token {want!r} "
            f"({want_id}) once, first: this TransformerLens / tokenizer combination adds start tokens "
            "differently from the one kvmem was checked with; every result would shift by a position."
        )
    text, ids = probe
    if ids:
        got = tuple(model.to_tokens(text)[0].tolist())
        if got != tuple(ids):
            raise DependencyVersionError(
                f"model.to_tokens({text!r}) gives {list(got)}, expected {list(ids)} (the tokenizer's "
                "known answer): the bridge tokenizes differently from the checked tokenizer."
            )


def boot_bridge(hf_model, tokenizer, *, boot_name: str, model_name: str, device: Any = None,
                dtype: torch.dtype | None = None, start_token: str | None = None,
                probe: tuple[str, tuple[int, ...]] = ("", ()), compat: dict[str, bool] | None = None):
    """A `TransformerBridge` in compatibility mode around an fp32 Hugging Face model already loaded.

    `boot_name` goes to ``boot_transformers`` (a Hugging Face repository name for a known model, so
    TransformerLens prints no alias warning); `model_name` becomes ``cfg.model_name``. The weights
    are processed in fp32 on the CPU, then moved to `device` (None: TransformerLens's choice) and
    cast to `dtype` (None: float32). `compat` overrides ``enable_compatibility_mode``'s processing
    flags (fold_ln, center_writing_weights, center_unembed, fold_value_biases).
    """
    TransformerBridge = _bridge_class()
    if tokenizer is None:
        raise InvalidArgumentError(
            f"{model_name}: a TransformerBridge needs a tokenizer here (none was found beside the "
            "weights, and kvmem never fetches one from the hub); pass tokenizer=..."
        )
    hf_model = hf_model.to(torch.float32)
    hf_model.eval()
    with _quiet_transformer_lens():
        bridge = TransformerBridge.boot_transformers(boot_name, hf_model=hf_model, tokenizer=tokenizer)
        bridge.enable_compatibility_mode(disable_warnings=True, **(compat or {}))
    bridge.eval()
    bridge.cfg.model_name = model_name
    target = torch.device(device) if device is not None else default_device()
    if target.type != "cpu":
        bridge.to(target, print_details=False)  # updates cfg.device too
    if dtype not in (None, torch.float32):
        bridge.to(dtype, print_details=False)
    check_start_token(bridge, start_token, probe)
    return bridge


def boot_official(name: str, *, device: Any = None, dtype: torch.dtype | None = None):
    """An official TransformerLens / Hugging Face name as a bridge in compatibility mode (needs the hub)."""
    TransformerBridge = _bridge_class()
    with _quiet_transformer_lens():
        bridge = TransformerBridge.boot_transformers(name, device=device, dtype=torch.float32)
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    if dtype not in (None, torch.float32):
        bridge.to(dtype, print_details=False)
    return bridge


__all__ = ["boot_bridge", "boot_official", "check_start_token", "default_device"]
