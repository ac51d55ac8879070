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
    loads, so a missing `--corpus` fails at once."""
    given = getattr(args, "corpus", None)
    if given in (None, "factworld"):
        if given is None and not names_factworld(args.model):
            raise InvalidArgumentError(
                f"{what} on {args.model} needs --corpus (a text file, or 'wiki') for ROME's key statistics."
            )
        from kvmem.factworld import corpus as factworld_corpus

        return factworld_corpus(), FACTWORLD_CORPUS
    if given == "wiki":
        return given, given
    # a path, or a name in the data folder ($KVMEM_DATA): "corpus/wiki_vital_en.txt"
    path = data_path(given, "corpus file")
    if not path.is_file():
        raise InvalidArgumentError(f"--corpus {given} is not a file. Pass --corpus PATH to a text file, or 'wiki'.")
    return str(path), str(given)


def n_tokens(args: argparse.Namespace, model) -> int:
    from kvmem.pipelines.rome_settings import stats_tokens

    return args.n_tokens or stats_tokens(model)


def stats(args: argparse.Namespace, model, layer: int, what: str):
    """ROME's second-moment statistics of `layer` over `--corpus` (cached under `--cache-dir`)."""
    from kvmem.cli.runtime import executor
    from kvmem.editing import second_moment

    text, _ = corpus(args, what)
    return second_moment(model, layer, text, n_tokens=n_tokens(args, model), cache_dir=args.cache_dir,
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
