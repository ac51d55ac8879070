"""Loaders for known facts, CounterFact, PARAREL and corpora, on the shared data and on bad files."""

from __future__ import annotations

import json

import pytest

from conftest import shared_data
from kvmem.data import (
    builtin_facts,
    cloze_to_prefix,
    ensure_nonempty,
    load_counterfact,
    load_known_facts,
    load_pararel,
    pararel_counterfact,
    read_corpus,
    relation_template,
)
from kvmem.errors import DataFormatError, InvalidArgumentError, KvmemError
from kvmem.core.facts import Fact


def test_known_facts():
    facts = load_known_facts(shared_data("known_1000.json"))
    assert len(facts) == 1209
    f = facts[0]
    assert isinstance(f, Fact) and f.subject in f.prompt and f.target_true == "Antarctica"
    assert f.relation_id == "P30"
    assert len(load_known_facts(shared_data("known_1000.json"), limit=5)) == 5


def test_counterfact_full_schema():
    recs = load_counterfact(shared_data("counterfact", "counterfact_dev_250.json"))
    assert len(recs) == 250
    r = recs[0]
    assert r.case_id == 70 and r.subject == "Beirut"
    assert r.request.prompt == "The twin city of Beirut is"
    assert (r.request.target_true, r.request.target_new) == ("Istanbul", "Florence")
    assert r.paraphrase_prompts and r.neighborhood_prompts and r.attribute_prompts and r.generation_prompts
    assert all(rec.request.target_new != rec.request.target_true for rec in recs)


def test_pararel_left_to_right():
    bags = load_pararel(shared_data("pararel", "data_all_allbags.json"), relations=["P101", "P103"], min_prompts=2)
    assert bags and {b.relation for b in bags} == {"P101", "P103"}
    for b in bags[:200]:
        assert len(b.prompts) >= 2 and len(set(b.prompts)) == len(b.prompts)
        assert all("[MASK]" not in p and p == p.rstrip() for p in b.prompts)
    with pytest.raises(InvalidArgumentError):
        load_pararel(shared_data("pararel", "data_all_allbags.json"), relations=["nope"])


def test_relation_template_majority_survives_shared_words():
    firsts = [f"{s} works for [MASK] ." for s in ("Steve Jobs", "Steve Wozniak", "Paul Allen", "Bill Gates", "Bill Joy")]
    # neighbours "Steve Jobs"/"Steve Wozniak" and "Bill Gates"/"Bill Joy" share a first word; the majority does not
    assert relation_template(firsts) == ("", " works for [MASK] .")
    firsts = [f"The capital of {s} is [MASK] ." for s in ("Azerbaijan", "Brody Raion", "Cook County")]
    assert relation_template(firsts) == ("The capital of ", " is [MASK] .")
    assert relation_template(["only one [MASK]."]) is None


def test_pararel_subjects_and_counterfact_style_records():
    bags = load_pararel(shared_data("pararel", "data_all_allbags.json"), relations=["P101", "P36", "P108"], min_prompts=3)
    by_rel = {b.relation: b for b in reversed(bags)}  # the first bag of each relation
    assert by_rel["P101"].subject == "Alan Turing"
    assert by_rel["P36"].subject == "Azerbaijan"
    assert by_rel["P108"].subject == "Steve Jobs"
    with_subject = [b for b in bags if b.subject is not None]
    assert len(with_subject) > 0.95 * len(bags)
    assert all(b.subject in p for b in with_subject for p in b.prompts)

    recs = pararel_counterfact(bags, seed=3)
    assert recs == pararel_counterfact(bags, seed=3)  # seeded
    assert len({r.case_id for r in recs}) == len(recs) > 0.95 * len(with_subject)
    objects = {}
    for b in with_subject:
        objects.setdefault(b.relation, set()).add(b.target)
    truths, subject_of = {}, {}
    for b in with_subject:
        truths.setdefault((b.relation, b.subject), set()).add(b.target)
        subject_of[b.prompts[0]] = (b.subject, b.relation)
    for r in recs[::25]:
        q = r.request
        assert q.subject in q.prompt and r.subject == q.subject
        assert q.target_new in objects[q.relation_id] and q.target_new not in truths[(q.relation_id, q.subject)]
        assert r.paraphrase_prompts and all(q.subject in p for p in r.paraphrase_prompts)
        for n in r.neighborhood_prompts:  # other subjects, same relation, same true object
            s, rel = subject_of[n]
            assert s != q.subject and rel == q.relation_id
            assert q.target_true in truths[(rel, s)] and q.target_new not in truths[(rel, s)]
    assert pararel_counterfact(bags, seed=4) != recs
    for r in recs:  # the first target token tells old and new apart
        assert r.request.target_new.split()[0] != r.request.target_true.split()[0]
    only_p36 = [b for b in bags if b.relation == "P36"]
    assert pararel_counterfact(only_p36, seed=3) == [r for r in recs if r.request.relation_id == "P36"]
    with pytest.raises(InvalidArgumentError):
        pararel_counterfact([], seed=0)
    import dataclasses

    with pytest.raises(InvalidArgumentError, match="index"):
        pararel_counterfact([dataclasses.replace(b, index=-1) for b in only_p36[:3]])


def test_cloze_to_prefix():
    assert cloze_to_prefix("Alan Turing works in the field of [MASK].") == "Alan Turing works in the field of"
    assert cloze_to_prefix("[MASK] is the specialization of Alan Turing.") is None
    assert cloze_to_prefix("The [MASK] of [MASK].") is None
    assert cloze_to_prefix("[MASK].") is None


def test_corpora(tmp_path):
    docs = list(read_corpus(shared_data("corpus", "wiki_vital_en.txt")))
    # 10,033 summaries; a few hold blank lines inside and read as two paragraphs.
    assert 10033 <= len(docs) <= 10100 and all(d.strip() for d in docs)
    brown = read_corpus(shared_data("corpus", "brown.txt"))
    assert next(brown).startswith("The Fulton County Grand Jury")
    p = tmp_path / "c.txt"
    p.write_text("one\ntwo lines\n\n\nthree\n")
    assert list(read_corpus(p)) == ["one two lines", "three"]
    assert list(read_corpus(["a", "  ", "b"])) == ["a", "b"]
    with pytest.raises(DataFormatError):
        list(read_corpus(tmp_path / "missing.txt"))
    with pytest.raises(InvalidArgumentError):
        list(ensure_nonempty(read_corpus([])))


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        load_known_facts(bad)
    bad.write_text(json.dumps([{"subject": "x"}]))
    with pytest.raises(DataFormatError, match="lacks field"):
        load_known_facts(bad)
    bad.write_text(json.dumps([{"case_id": 1, "requested_rewrite": {"prompt": "no slot", "subject": "s",
               "target_new": {"str": "a"}, "target_true": {"str": "b"}}, "paraphrase_prompts": [], "neighborhood_prompts": []}]))
    with pytest.raises(DataFormatError, match="no '\\{\\}'"):
        load_counterfact(bad)
    assert issubclass(DataFormatError, KvmemError)


def test_builtin_facts():
    facts = builtin_facts()
    assert len(facts) == 30 and all(f.target_true for f in facts)
