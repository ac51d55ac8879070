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
    read_corpus,
)
from kvmem.errors import DataFormatError, InvalidArgumentError, KvmemError
from kvmem.prompts import Fact


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
