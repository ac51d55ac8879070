"""Options several commands share, turned into what the library takes: the fact of `--prompt` /
`--fact-index`, the corpus and the second-moment statistics of ROME."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from kvmem.core.facts import Fact
from kvmem.datafiles import data_path
from kvmem.errors import InvalidArgumentError

FACTWORLD_CORPUS = "factworld training sentences"


def names_factworld(name: str) -> bool:
    """Whether a --model value names the shipped factworld model (known before it loads)."""
    return str(name) == "factworld"


def corpus(args: argparse.Namespace, what: str) -> tuple[Any, str]:
    """(the corpus of `--corpus`, its name) for second-moment statistics; checked before the model
    loads, so a missing `--corpus` fails at once. Without `--corpus`: factworld's training text on
    factworld, else `default_corpus()` (the Wikipedia summaries when they are here, else "samples",
    the model's own text, sampled once the model has loaded: `model_corpus`)."""
    from kvmem.pipelines.rome_settings import SAMPLES, default_corpus

    given = getattr(args, "corpus", None)
    if given == "factworld" or (given is None and names_factworld(args.model)):
        from kvmem.factworld import corpus as factworld_corpus

        return factworld_corpus(), FACTWORLD_CORPUS
    if given is None:
        found = default_corpus()
        return found, ("the model's own samples (no --corpus given)" if found == SAMPLES
                       else f"the Wikipedia summaries ({found}; no --corpus given)")
    if given in ("wiki", SAMPLES):
        return given, given
    # a path, or a name in the data folder ($KVMEM_DATA): "corpus/wiki_vital_en.txt"
    path = data_path(given, "corpus file")
    if not path.is_file():
        raise InvalidArgumentError(f"--corpus {given} is not a file. Pass --corpus PATH to a text file, 'wiki' or "
                                   f"'{SAMPLES}'.")
    return str(path), str(given)


def model_corpus(args: argparse.Namespace, model, text):
    """`text` of `corpus()`, with "samples" replaced by the model's own text (cached)."""
    from kvmem.pipelines.rome_settings import SAMPLES

    if not (isinstance(text, str) and text == SAMPLES):
        return text
    from kvmem.editing.samples import model_samples

    return model_samples(model, n_tokens(args, model, SAMPLES), seed=getattr(args, "seed", 0) or 0,
                         cache_dir=args.cache_dir, progress=not args.quiet)


def n_tokens(args: argparse.Namespace, model, corpus=None) -> int:
    """`--n-tokens`, else `stats_tokens(model, corpus)` (fewer for the model's own samples)."""
    from kvmem.pipelines.rome_settings import stats_tokens

    return args.n_tokens or stats_tokens(model, corpus)


def stats(args: argparse.Namespace, model, layer: int, what: str):
    """ROME's second-moment statistics of `layer` over `--corpus` (cached under `--cache-dir`)."""
    from kvmem.cli.runtime import executor
    from kvmem.editing import second_moment

    given = corpus(args, what)[0]
    text = model_corpus(args, model, given)
    return second_moment(model, layer, text, n_tokens=n_tokens(args, model, given), cache_dir=args.cache_dir,
                         progress=not args.quiet, executor=executor(args))


def _pick(facts: list, index: int):
    if not 0 <= index < len(facts):
        raise InvalidArgumentError(f"--fact-index must be in [0, {len(facts) - 1}], got {index}.")
    return facts[index]


def single_fact(args: argparse.Namespace) -> Fact:
    """The fact of `--prompt/--subject/--target/--new`, else built-in fact `--fact-index` (the
    factworld CounterFact record on factworld, `kvmem.data.builtin_facts` on other models)."""
    new = getattr(args, "new", None)
    if args.prompt:
        if not args.subject:
            raise InvalidArgumentError("--prompt needs --subject (the subject as written in the prompt).")
        return Fact(args.prompt, args.subject, target_true=args.target, target_new=new)
    if args.subject or args.target:
        raise InvalidArgumentError("--subject / --target go with --prompt; pass all of them, or none.")
    if names_factworld(args.model):
        fact = factworld_record(args.fact_index).request
    else:
        from kvmem.data import builtin_facts

        fact = _pick(builtin_facts(target_new=True), args.fact_index)
    return fact if new is None else replace(fact, target_new=new)


def factworld_record(index: int):
    """Factworld CounterFact record `index` (`kvmem.factworld.counterfact_records`)."""
    from kvmem.factworld import counterfact_records

    return _pick(counterfact_records(), index)
