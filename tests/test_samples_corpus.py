"""The statistics corpus when none is given: the Wikipedia summaries when they are here, else text
the model writes (kvmem.editing.samples), sampled once and cached."""

from __future__ import annotations

import json

import pytest

from kvmem.editing.samples import SAMPLES, model_samples
from kvmem.errors import CacheError
from kvmem.pipelines.rome_settings import WIKI_SUMMARIES, default_corpus, stats_tokens


def test_samples_are_seeded_cached_and_checked(tiny_gpt2, tmp_path):
    docs = model_samples(tiny_gpt2, 300, seed=1, length=16, cache_dir=tmp_path, progress=False)
    assert len(docs) == -(-300 * 115 // (100 * 16)) and all(isinstance(d, str) for d in docs)
    [path] = (tmp_path / "samples").iterdir()
    assert model_samples(tiny_gpt2, 300, seed=1, length=16, cache_dir=tmp_path) == docs  # read back
    other = model_samples(tiny_gpt2, 300, seed=2, length=16, cache_dir=tmp_path / "b", progress=False)
    assert other != docs
    # a fresh sampling gives the same text (seeded), and a tampered cache file is refused
    assert model_samples(tiny_gpt2, 300, seed=1, length=16, cache_dir=tmp_path / "c", progress=False) == docs
    data = json.loads(path.read_text())
    data["docs"][0] = "tampered"
    path.write_text(json.dumps(data))
    with pytest.raises(CacheError, match="delete the file"):
        model_samples(tiny_gpt2, 300, seed=1, length=16, cache_dir=tmp_path)
    (tmp_path / "file").write_text("")  # a cache folder that cannot be made: the error says what to set
    with pytest.raises(CacheError, match="KVMEM_CACHE"):
        model_samples(tiny_gpt2, 300, seed=1, length=16, cache_dir=tmp_path / "file" / "cache", progress=False)


def test_default_corpus_needs_no_download(tmp_path, monkeypatch, tiny_gpt2):
    import kvmem.data

    def not_installed():
        raise kvmem.data.MissingDependencyError("not installed")

    monkeypatch.setattr(kvmem.data, "wiki_summaries_path", not_installed)
    monkeypatch.delenv("KVMEM_DATA", raising=False)
    assert default_corpus() == SAMPLES
    folder = tmp_path / "data"
    (folder / "corpus").mkdir(parents=True)
    (folder / WIKI_SUMMARIES).write_text("Some text.\n\nMore text.\n")
    monkeypatch.setenv("KVMEM_DATA", str(folder))
    assert default_corpus() == str(folder / WIKI_SUMMARIES)
    # samples cost a decoding step per token: a quarter of the tokens of given text
    d = int(tiny_gpt2.cfg.d_mlp)
    assert stats_tokens(tiny_gpt2) == max(20_000, 40 * d) and stats_tokens(tiny_gpt2, SAMPLES) == max(20_000, 10 * d)


def test_cli_without_corpus_on_a_real_model(tmp_path, monkeypatch):
    """`kvmem demo/edit/stats --model gemma-3-270m` without --corpus: no error, nothing downloaded;
    'samples' is kept as a name until the model has loaded."""
    import argparse

    import kvmem.data
    from kvmem.cli import options

    monkeypatch.setattr(kvmem.data, "wiki_summaries_path",
                        lambda: (_ for _ in ()).throw(kvmem.data.MissingDependencyError("not installed")))
    monkeypatch.delenv("KVMEM_DATA", raising=False)
    args = argparse.Namespace(corpus=None, model="gemma-3-270m")
    assert options.corpus(args, "kvmem demo") == (SAMPLES, "the model's own samples (no --corpus given)")
    args.corpus = "samples"
    assert options.corpus(args, "kvmem demo") == (SAMPLES, SAMPLES)
