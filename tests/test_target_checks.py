"""Warnings about a fact's target: several tokens of which causal tracing scores the first, and
a target the model does not predict (`kvmem.config.predicts`); `--strict` makes them errors."""

from __future__ import annotations

import html
import json
import warnings
from dataclasses import replace

import pytest

from kvmem import config
from kvmem.cli import common, main
from kvmem.errors import KvmemWarning, MultiTokenTargetWarning, UnpredictedFactWarning
from kvmem.factworld import counterfact_records
from kvmem.tracing import causal_trace, trace_all
from kvmem.tracing.checks import check_target

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fact():
    return counterfact_records(n=1)[0].request  # ' Berlin', predicted with p 0.97; ' Tokyo' rank 60


def test_predicts_rule():
    assert config.predicts(0, 0.5) and config.predicts(config.PREDICTED_TOP_K - 1, config.PREDICTED_MIN_P)
    assert not config.predicts(config.PREDICTED_TOP_K, 0.5)  # not in the top 5
    assert not config.predicts(0, config.PREDICTED_MIN_P / 2)  # p too small


def test_check_target(factworld, fact):
    check = check_target(factworld, fact)
    assert check.predicted and check.rank == 0 and check.target_tokens == (" Berlin",)
    assert check.remarks("causal tracing") == []
    new = check_target(factworld, fact, "new")
    assert not new.predicted and new.rank >= config.PREDICTED_TOP_K
    assert check_target(factworld, replace(fact, target_true=None)) is None


def test_a_predicted_one_token_target_gives_no_warning(factworld, fact):
    with warnings.catch_warnings():
        warnings.simplefilter("error", KvmemWarning)
        causal_trace(factworld, fact, samples=2, progress=False)


def test_multi_token_target_warns_once_with_the_traced_token(factworld, fact):
    two = replace(fact, target_true=" Berlin Tokyo")
    with pytest.warns(MultiTokenTargetWarning) as caught:
        trace = causal_trace(factworld, two, kind="mlp", samples=2, progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, KvmemWarning)]
    assert messages == ["target ' Berlin Tokyo' is 2 tokens; causal tracing scores its first token ' Berlin' only"]
    assert trace.answer == " Berlin"


def test_unpredicted_target_warns(factworld, fact):
    wrong = replace(fact, target_true=fact.target_new)
    with pytest.warns(UnpredictedFactWarning, match="does not predict ' Tokyo'.*top 5 and p >= 0.01"):
        traces = trace_all(factworld, wrong, kinds=["mlp"], samples=2, progress=False)
    assert traces.traces[0].correct is False


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trace_warns_and_strict_stops(factworld, fact, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda name, quiet=False, device=None: factworld)
    argv = ["trace", "--prompt", fact.prompt, "--subject", fact.subject, "--target", fact.target_new,
            "--samples", "2", "--kinds", "mlp", "--quiet"]
    code, _, err = _cli(capsys, *argv, "--out", tmp_path / "a")
    assert code == 0 and "kvmem: warning: the model does not predict ' Tokyo'" in err and "Traceback" not in err
    code, _, err = _cli(capsys, *argv, "--out", tmp_path / "b", "--strict")
    assert code == 2 and "does not predict ' Tokyo'" in err and "--strict" in err
    assert not (tmp_path / "b" / "summary.json").exists()


def test_demo_reports_remarks_and_strict_stops_before_the_work(factworld, fact, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda name, quiet=False, device=None: factworld)
    argv = ["demo", "--prompt", fact.prompt, "--subject", fact.subject, "--target", " Berlin Tokyo",
            "--new", " Paris", "--samples", "2", "--steps", "2", "--n-tokens", "2000"]
    code, out, err = _cli(capsys, *argv, "--out", tmp_path / "b", "--strict", "--cache-dir", tmp_path / "c2")
    assert code == 2 and "is 2 tokens" in err and not (tmp_path / "c2").exists()  # before ROME's statistics
    code, out, err = _cli(capsys, *argv, "--out", tmp_path / "a", "--cache-dir", tmp_path / "c")
    assert code == 0, err
    said = ("target ' Berlin Tokyo' is 2 tokens; causal tracing and the memory view score its first token "
            "' Berlin' only")
    assert err.count(said) == 1 and f"warning: {said}" in out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert said in summary["remarks"]
    assert html.escape(said) in (tmp_path / "a" / "report.html").read_text()


def test_average_indirect_effect_warns_per_fact(factworld, fact, tmp_path):
    """Each fact averaged over says what happened to it, by the single-fact rules: a wrong answer
    is skipped (and counted), a target of several tokens is traced on its first; a resumed run
    says the same from its log."""
    from kvmem.tracing import average_indirect_effect

    facts = [fact, replace(fact, target_true=fact.target_new), replace(fact, target_true=" Berlin Tokyo")]
    kw = dict(kinds=["mlp"], samples=2, progress=False, log=str(tmp_path / "log.jsonl"))
    for _ in range(2):  # computed, then read back from the log
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = average_indirect_effect(factworld, facts, **kw)
        said = [(w.category, str(w.message)) for w in caught if issubclass(w.category, KvmemWarning)]
        assert (res.n_facts, res.n_skipped) == (2, 1)
        assert [c for c, _ in said] == [UnpredictedFactWarning, MultiTokenTargetWarning]
        assert said[0][1].startswith(f"fact 1 ({fact.prompt!r} -> ' Tokyo') is skipped: the model's top next token "
                                     "is not the target's first token ' Tokyo'")
        assert said[1][1] == (f"fact 2 ({fact.prompt!r} -> ' Berlin Tokyo'): the target is 2 tokens; causal tracing "
                              "scores its first token ' Berlin' only")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KvmemWarning)  # --strict
        with pytest.raises(UnpredictedFactWarning):
            average_indirect_effect(factworld, facts, **kw)
