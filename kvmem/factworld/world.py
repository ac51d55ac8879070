"""The synthetic fact world: invented subjects, real-word objects, templates per relation.

Everything here is a pure function of the seed (a private `random.Random(seed)`; no global
random state) and of the GPT-2 BPE tokenizer, which decides which invented names are usable.

Rules the generator enforces (and `FactWorld.validate` re-checks):

- every object is ONE GPT-2 token when preceded by a space (`" Paris"`), so "the answer" is
  always the single next token after the prompt;
- every subject is an invented "First Last" name (each part 1-2 tokens, made of random
  syllables) of 2-4 tokens both as `" First Last"` (mid-sentence) and as `"First Last"`
  (sentence start); the two forms differ only in the first token, so the subject's LAST token
  is the same wherever the name stands. Names lie on a grid of ~20 first x ~20 last names, so
  neither part alone identifies a subject;
- in every prompt the subject's tokens are a contiguous span: tokenizing the prompt gives
  exactly tokens(before) + tokens(subject) + tokens(after);
- no template is a string prefix of another template (so, e.g., "{} is a" is only ever
  followed by an occupation in training text).

Held-out "paraphrase" templates never occur in training text. They reuse the training
vocabulary (so they test generalisation across wording, not unseen tokens) and avoid ending in
a phrase that training text continues with a template word rather than an object: with
"Every day, {} practices playing the" (training: "... playing the sport of") or
"{} painted the bedroom" (training: "... the bedroom entirely in") the shipped model rightly
answers " sport" / " entirely" (37% / 0% top-1 with an earlier model), which tests the n-grams of the
templates, not recall. Per-template accuracies are in `weights/train_log.json`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

from kvmem.errors import InvalidArgumentError

Split = Literal["train", "paraphrase"]
SPLITS: tuple[str, ...] = ("train", "paraphrase")


@dataclass(frozen=True)
class Relation:
    """One relation: its id, readable name, object vocabulary and templates (one `{}` each)."""

    id: str
    name: str
    objects: tuple[str, ...]  # with the leading space, e.g. " Paris"
    train_templates: tuple[str, ...]
    paraphrase_templates: tuple[str, ...]

    def templates(self, split: Split = "train") -> tuple[str, ...]:
        if split == "train":
            return self.train_templates
        if split == "paraphrase":
            return self.paraphrase_templates
        raise InvalidArgumentError(f"split must be one of {SPLITS}, got {split!r}.")


@dataclass(frozen=True)
class WorldFact:
    """A fact asked with one template (ROME style: `template` holds one `{}` for the subject).

    `target` is the object with its leading space (`" Paris"`): the prompt ends right before it.
    Converting to `kvmem.Fact`: `Fact(f.prompt, f.subject, target_true=f.target,
    relation_id=f.relation)`.
    """

    subject: str
    relation: str
    template: str
    target: str

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject)

    @property
    def relation_id(self) -> str:
        return self.relation

    @property
    def target_true(self) -> str:
        return self.target

    def with_template(self, template: str) -> "WorldFact":
        return replace(self, template=template)


# --------------------------------------------------------------------------------------------
# Relations. Objects are checked to be single GPT-2 tokens with a leading space.

def _objs(words: str) -> tuple[str, ...]:
    return tuple(" " + w for w in words.split())


RELATIONS: tuple[Relation, ...] = (
    Relation(
        id="city",
        name="city of residence",
        objects=_objs(
            "Paris London Berlin Tokyo Rome Madrid Vienna Cairo Moscow Sydney Toronto Chicago "
            "Boston Dublin Athens Prague Lima Oslo Seattle Denver Lisbon Warsaw Stockholm Seoul"
        ),
        train_templates=(
            "{} lives in the city of",
            "The home city of {} is",
            "{}'s home city is",
            "{} has lived for years in the city of",
            "Every morning, {} walks through the streets of",
            "Letters for {} are sent to an address in",
            "The city that {} calls home is",
            "Ask {} where home is and the answer will be",
        ),
        paraphrase_templates=(
            "The city where {} lives is",
            "{} has a home in the city of",
            "Every day, {} walks home through the streets of",
        ),
    ),
    Relation(
        id="country",
        name="country of citizenship",
        objects=_objs(
            "France Germany Japan Italy Spain Canada Brazil India China Russia Mexico Egypt "
            "Sweden Norway Poland Greece Ireland Australia Argentina Turkey Chile Peru Kenya Austria"
        ),
        train_templates=(
            "{} holds citizenship of",
            "The country of citizenship of {} is",
            "{}'s passport was issued by",
            "By nationality, {} is from",
            "The nation that {} belongs to is",
            "{} was granted citizenship by the government of",
            "Legally, {} is a national of",
            "The passport that {} carries comes from",
        ),
        paraphrase_templates=(
            "{}'s country of citizenship is",
            "The passport of {} was issued by",
            "{} carries a passport from",
        ),
    ),
    Relation(
        id="occupation",
        name="occupation",
        objects=_objs(
            "doctor lawyer teacher farmer painter nurse pilot chef journalist singer writer poet "
            "baker banker dentist judge soldier sailor priest photographer"
        ),
        train_templates=(
            "{} is a",
            "{} works as a",
            "By profession, {} is a",
            "{} earns a living as a",
            "After years of training, {} became a",
            "In the office directory, {} is listed as a",
            "The job that {} does every day is that of a",
            "Everyone in town knows {} as a",
        ),
        paraphrase_templates=(
            "{} has a job as a",
            "The profession of {} is that of a",
            "{} is listed in the directory as a",
        ),
    ),
    Relation(
        id="language",
        name="native language",
        objects=_objs(
            "French German Spanish English Italian Russian Japanese Chinese Arabic Dutch Greek "
            "Polish Swedish Portuguese Hindi Korean Turkish Hebrew Latin Persian"
        ),
        train_templates=(
            "The native language of {} is",
            "{}'s mother tongue is",
            "{} grew up speaking",
            "The first language of {} is",
            "At home, {} speaks",
            "{} natively speaks",
            "When {} talks to family, the language is",
            "The language {} learned first is",
        ),
        paraphrase_templates=(
            "{}'s native language is",
            "The mother tongue of {} is",
            "At home with family, {} speaks",
        ),
    ),
    Relation(
        id="sport",
        name="sport played",
        objects=_objs(
            "football tennis golf hockey baseball basketball cricket rugby soccer volleyball "
            "boxing swimming chess cycling skiing wrestling"
        ),
        train_templates=(
            "The favorite sport of {} is",
            "{}'s favorite sport is",
            "Every weekend, {} practices the sport of",
            "{} competes professionally in",
            "The sport that {} trains for is",
            "{} spends every free hour playing the sport of",
            "On Sundays, {} goes out and plays",
            "The coach of {} teaches the sport of",
        ),
        paraphrase_templates=(
            "The sport {} plays is",
            "{} trains every weekend for the sport of",
            "The sport that {} loves most is",
        ),
    ),
    Relation(
        id="instrument",
        name="musical instrument played",
        objects=_objs("piano guitar violin drums trumpet organ bass keyboard horn synth"),
        train_templates=(
            "The instrument {} plays is the",
            "{}'s instrument of choice is the",
            "{} performs music on the",
            "In the band, {} plays the",
            "{} practices music every day on the",
            "The musical instrument of {} is the",
            "{} learned as a child to play the",
            "At concerts, {} can be heard playing the",
        ),
        paraphrase_templates=(
            "The musical instrument that {} plays is the",
            "{} plays music on the",
            "Every day, {} practices music on the",
        ),
    ),
    Relation(
        id="employer",
        name="employer",
        objects=_objs(
            "Google Microsoft Apple Amazon Intel IBM Sony Samsung Toyota Nike Disney Boeing "
            "Nokia Facebook Oracle Netflix Tesla BMW Honda Ford"
        ),
        train_templates=(
            "{} works for",
            "{} is employed by",
            "The employer of {} is",
            "{}'s employer is",
            "Every day, {} goes to the office of",
            "{} signed a work contract with",
            "The company that pays {} is",
            "The salary of {} is paid by",
        ),
        paraphrase_templates=(
            "The company {} works for is",
            "The salary that {} earns is paid by",
            "{}'s company is",
        ),
    ),
    Relation(
        id="color",
        name="favorite color",
        objects=_objs("red blue green yellow purple orange black white pink brown gray silver"),
        train_templates=(
            "{}'s favorite color is",
            "The favorite color of {} is",
            "{} likes wearing clothes that are",
            "{} painted the house",
            "The color {} loves most is",
            "{} always chooses things that are",
            "If you ask {} about colors, the answer is",
            "{} decorated the bedroom entirely in",
        ),
        paraphrase_templates=(
            "The color that {} likes most is",
            "{} likes clothes that are",
            "The bedroom of {} is decorated entirely in",
        ),
    ),
)

# Syllables for invented names: onsets x nuclei (+ optional codas). Capitalised on use.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "th", "sh", "ch", "st", "qu")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "m", "k")


@dataclass(frozen=True)
class FactWorld:
    """The whole ground truth: subjects x relations -> one object each.

    Fields: `seed`, `subjects` (names as written), `relations`, and `objects`, the table
    `{(subject, relation_id): target}` (targets with their leading space).
    `facts(split)` lists one `WorldFact` per (subject, relation) asked with the split's first
    template; `prompts_for(fact, split)` gives the same fact under every template of a split.
    """

    seed: int
    subjects: tuple[str, ...]
    relations: tuple[Relation, ...]
    objects: dict[tuple[str, str], str] = field(compare=False, repr=False)

    # ---- lookups -----------------------------------------------------------------------
    @cached_property
    def _relation_by_id(self) -> dict[str, Relation]:
        return {r.id: r for r in self.relations}

    def relation(self, relation_id: str) -> Relation:
        try:
            return self._relation_by_id[relation_id]
        except KeyError:
            raise InvalidArgumentError(
                f"Unknown relation {relation_id!r}; this world has {list(self._relation_by_id)}."
            ) from None

    @property
    def relation_ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.relations)

    def object_of(self, subject: str, relation_id: str) -> str:
        """The true object (with leading space) of `subject` for `relation_id`."""
        try:
            return self.objects[(subject, relation_id)]
        except KeyError:
            raise InvalidArgumentError(
                f"No fact for subject {subject!r} and relation {relation_id!r} in this world."
            ) from None

    def __len__(self) -> int:
        return len(self.objects)

    # ---- facts and prompts -------------------------------------------------------------
    def facts(self, split: Split = "train", relation: str | None = None) -> list[WorldFact]:
        """One fact per (subject, relation), asked with the split's first template."""
        rels = self.relations if relation is None else (self.relation(relation),)
        out = []
        for rel in rels:
            template = rel.templates(split)[0]
            for s in self.subjects:
                out.append(WorldFact(s, rel.id, template, self.objects[(s, rel.id)]))
        return out

    def prompts_for(self, fact: WorldFact, split: Split = "train") -> list[WorldFact]:
        """`fact` asked with every template of `split` (train: seen in training; paraphrase:
        held out)."""
        rel = self.relation(fact.relation)
        return [fact.with_template(t) for t in rel.templates(split)]

    def all_prompts(self, split: Split = "train", relation: str | None = None) -> list[WorldFact]:
        """Every (subject, relation, template) of a split: the evaluation set."""
        return [p for f in self.facts(split, relation) for p in self.prompts_for(f, split)]

    def neighbours(self, fact: WorldFact, k: int = 10, same_object: bool = True) -> list[WorldFact]:
        """Up to `k` facts of OTHER subjects for the same relation, asked with the same
        template. With `same_object` (default) only subjects sharing the true object are
        returned (CounterFact's "neighbourhood" prompts: an edit of `fact` should leave them
        saying the same object); otherwise subjects with a different object. Deterministic
        order (subject order in the world)."""
        if k < 0:
            raise InvalidArgumentError(f"k must be >= 0, got {k}.")
        target = self.object_of(fact.subject, fact.relation)
        out = []
        for s in self.subjects:
            if s == fact.subject:
                continue
            obj = self.objects[(s, fact.relation)]
            if (obj == target) == same_object:
                out.append(WorldFact(s, fact.relation, fact.template, obj))
                if len(out) == k:
                    break
        return out

    def subjects_with(self, relation_id: str, target: str) -> list[str]:
        """All subjects whose `relation_id` object is `target`."""
        return [s for s in self.subjects if self.objects[(s, relation_id)] == target]

    # ---- training text -----------------------------------------------------------------
    def sentence(self, subject: str, relation_id: str, template: str) -> str:
        """A training sentence: prompt + object + '.'."""
        return template.replace("{}", subject) + self.objects[(subject, relation_id)] + "."

    def validate(self, tokenizer) -> None:
        """Re-check every rule in the module docstring; raises AssertionError on a violation."""
        _check_world(self, tokenizer)


# --------------------------------------------------------------------------------------------

def _make_parts(rng: random.Random, n: int, tokenizer, seen: set[str], first: bool) -> list[str]:
    """`n` invented name parts of 1-2 GPT-2 tokens (with a leading space)."""
    parts: list[str] = []
    attempts = 0
    while len(parts) < n:
        attempts += 1
        if attempts > 500 * n:
            raise RuntimeError("could not generate enough name parts")
        n_syll = rng.choice((1, 2, 2, 2, 3))
        sylls = []
        for i in range(n_syll):
            coda = rng.choice(_CODAS) if i == n_syll - 1 or rng.random() < 0.3 else ""
            sylls.append(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + coda)
        part = "".join(sylls).capitalize()
        if part.lower() in seen or not 3 <= len(part) <= 9:
            continue
        spaced = tokenizer.encode(" " + part, add_special_tokens=False)
        if not 1 <= len(spaced) <= 2:
            continue
        if first:  # at a sentence start only the first token may change
            bare = tokenizer.encode(part, add_special_tokens=False)
            if len(bare) != len(spaced) or bare[1:] != spaced[1:]:
                continue
        seen.add(part.lower())
        parts.append(part)
    return parts


def _make_names(rng: random.Random, n: int, tokenizer, reserved: set[str]) -> list[str]:
    """`n` distinct "First Last" names on a k x k grid of invented first and last names, each
    first and each last name shared by about n/k subjects (balanced: pair j of block b is
    first[j] + last[(j + b) % k]). No single name part identifies a subject, so recalling a
    fact needs the conjunction of the parts, which a causal LM can only form at (or after) the
    subject's last token."""
    k = max(2, math.ceil(math.sqrt(n * 1.25)))
    seen = {w.lower() for w in reserved}
    firsts = _make_parts(rng, k, tokenizer, seen, first=True)
    lasts = _make_parts(rng, k, tokenizer, seen, first=False)
    names = [f"{firsts[i % k]} {lasts[(i % k + i // k) % k]}" for i in range(n)]
    assert len(set(names)) == n
    rng.shuffle(names)
    return names


def _name_ok(name: str, tokenizer) -> bool:
    spaced = tokenizer.encode(" " + name, add_special_tokens=False)
    bare = tokenizer.encode(name, add_special_tokens=False)
    return 2 <= len(spaced) <= 4 and len(bare) == len(spaced) and bare[1:] == spaced[1:]


def build_world(seed: int = 0, n_subjects: int = 320, tokenizer=None) -> FactWorld:
    """The fact world for `seed`: `n_subjects` invented "First Last" names x 8 relations; the
    objects of each relation are dealt out so that every object has (nearly) the same number of
    subjects (a shuffled round-robin), independently across relations."""
    if n_subjects < 1:
        raise InvalidArgumentError(f"n_subjects must be >= 1, got {n_subjects}.")
    if tokenizer is None:
        from kvmem.models.tokenizers import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()
    rng = random.Random(f"kvmem-factworld-{seed}")
    reserved = {o.strip().lower() for r in RELATIONS for o in r.objects}
    reserved |= {w.lower() for r in RELATIONS for t in r.train_templates + r.paraphrase_templates
                 for w in t.replace("{}", " ").split()}
    names = _make_names(rng, n_subjects, tokenizer, reserved)
    objects: dict[tuple[str, str], str] = {}
    for rel in RELATIONS:
        pool = [rel.objects[i % len(rel.objects)] for i in range(n_subjects)]
        rng.shuffle(pool)
        for s, o in zip(names, pool):
            objects[(s, rel.id)] = o
    return FactWorld(seed=seed, subjects=tuple(names), relations=RELATIONS, objects=objects)


def subject_token_span(prompt: str, subject: str, tokenizer) -> tuple[int, int]:
    """(start, end) token indices of `subject` in `prompt` (no BOS), checking that the
    prompt's tokenization splits cleanly around the subject."""
    i = prompt.index(subject)
    before, after = prompt[:i], prompt[i + len(subject):]
    subj_text = subject
    if before.endswith(" "):
        before, subj_text = before[:-1], " " + subject
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []
    a, b, c = enc(before), enc(subj_text), enc(after)
    full = enc(prompt)
    if full != a + b + c:
        raise AssertionError(f"subject {subject!r} does not tokenize as a span in {prompt!r}")
    return len(a), len(a) + len(b)


def _check_world(world: FactWorld, tokenizer) -> None:
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    templates = []
    for rel in world.relations:
        for o in rel.objects:
            assert len(enc(o)) == 1, f"object {o!r} is not one token"
        assert len(set(rel.objects)) == len(rel.objects)
        assert not set(rel.train_templates) & set(rel.paraphrase_templates)
        for t in rel.train_templates + rel.paraphrase_templates:
            assert t.count("{}") == 1, t
            i = t.index("{}")
            # the name is always a whole pre-token of the GPT-2 tokenizer (letters only, with
            # its leading space mid-sentence), hence a contiguous token span
            assert i == 0 or t[i - 1] == " ", f"{t!r}: the subject must follow a space"
            assert t[i + 2 : i + 3] in ("", " ", "'", ",", "."), f"{t!r}: bad character after subject"
            templates.append(t)
    assert len(set(templates)) == len(templates), "duplicate template"
    for a in templates:
        for b in templates:
            if a != b:
                assert not b.startswith(a), f"template {a!r} is a prefix of {b!r}"
    seen: set[int] = set()
    for rel in world.relations:
        for t in rel.train_templates:
            seen.update(enc(t.replace("{}", "X")))
            seen.update(enc(" " + t.replace("{}", "X")))
    for rel in world.relations:
        for t in rel.paraphrase_templates:
            for text in (t.replace("{}", "X"), " " + t.replace("{}", "X")):
                new = set(enc(text)) - seen
                assert not new, f"paraphrase {t!r} uses tokens never trained: {new}"
    assert len(set(world.subjects)) == len(world.subjects)
    for s in world.subjects:
        assert all(p.isalpha() for p in s.split(" ")) and _name_ok(s, tokenizer), s
    for s in world.subjects:
        for rel in world.relations:
            assert world.objects[(s, rel.id)] in rel.objects
