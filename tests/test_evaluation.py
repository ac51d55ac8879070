"""CounterFact metrics: scores equal plain forwards, ROME's n-gram entropy, the table (the
benchmark script's tests: tests/benchmarks/test_bench_editing.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import shared_data
from kvmem.data import CounterFactRecord, load_counterfact
from kvmem.editing import RomeHparams, compute_rome_edit, model_fingerprint
from kvmem.errors import InvalidArgumentError
from kvmem.evaluation import (
    METRICS,
    evaluate_counterfact,
    evaluate_record,
    ngram_entropy,
    published_table,
    record_metrics,
    rome_editor,
    target_logprobs,
)
from kvmem.core.facts import Fact
from kvmem.core.tokenize import encode, target_token_ids


pytestmark = pytest.mark.usefixtures("one_thread")


def _record(case_id=0):
    rq = Fact.from_template("The twin city of {} is", "Beirut", target_true="Istanbul", target_new="Florence")
    return CounterFactRecord(
        case_id=case_id, request=rq, template="The twin city of {} is",
        paraphrase_prompts=("What is the twin city of Beirut? It is", "Beirut is a twin city of"),
        neighborhood_prompts=("The twin city of Athens is", "Vienna is a twin city of", "The twin city of London is"),
        attribute_prompts=(), generation_prompts=("Beirut's twin city is known for", "Beirut's twin city is known for"),
    )


def test_target_logprobs_equal_full_forward(tiny_model):
    items = [("The twin city of Beirut is", "Florence"), ("Vienna is a twin city of", "Saint Petersburg"),
             ("A", "Istanbul")]
    sums, counts = target_logprobs(tiny_model, items, batch_size=2)
    for (prompt, target), s, n in zip(items, sums, counts):
        ids = encode(tiny_model, prompt)
        tids = target_token_ids(tiny_model, prompt, target)
        logp = tiny_model(torch.tensor([ids + tids[:-1]]))[0].log_softmax(-1)
        want = sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(tids))
        assert n == len(tids)
        assert s.item() == pytest.approx(want, abs=1e-4)


def test_ngram_entropy_matches_rome_formula():
    # bigrams (a,b),(b,a),(a,b): H2 = H(2/3, 1/3); trigrams (a,b,a),(b,a,b): H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("same same same same") == 0.0
    assert ngram_entropy("one") == 0.0


def test_record_metrics_definitions(tiny_gpt2):
    rec = _record()
    m = record_metrics(tiny_gpt2, rec, generation=True, gen_tokens=6)
    items = [(p, t) for p in [rec.request.prompt, *rec.paraphrase_prompts, *rec.neighborhood_prompts]
             for t in ("Florence", "Istanbul")]
    sums, counts = target_logprobs(tiny_gpt2, items)
    s = (sums / counts).view(-1, 2)
    assert m["ES"] == float(s[0, 0] > s[0, 1])
    assert m["EM"] == pytest.approx(float(s[0, 0].exp() - s[0, 1].exp()))
    assert m["PS"] == pytest.approx(float((s[1:3, 0] > s[1:3, 1]).double().mean()))
    assert m["NS"] == pytest.approx(float((s[3:, 1] > s[3:, 0]).double().mean()))
    assert m["NM"] == pytest.approx(float((s[3:, 1].exp() - s[3:, 0].exp()).mean()))
    assert m["GE"] > 0
    # without paraphrases and neighbours: those metrics are NaN, under their own names
    bare = record_metrics(tiny_gpt2, dataclasses.replace(rec, paraphrase_prompts=(), neighborhood_prompts=()),
                          generation=False)
    assert set(bare) == {"ES", "EM", "PS", "PM", "NS", "NM", "GE"}
    assert bare["ES"] == m["ES"] and all(math.isnan(bare[k]) for k in ("PS", "PM", "NS", "NM", "GE"))


def test_evaluate_counterfact_unedited_and_edited(tiny_gated):
    fp = model_fingerprint(tiny_gated)
    hp = RomeHparams(prefixes=((3, 1),), v_num_grad_steps=3, mom2_adjustment=False)
    recs = [_record(0), _record(1)]

    def editor(model, rec):
        return compute_rome_edit(model, rec.request, layer=1, hparams=hp)

    ev = evaluate_counterfact(tiny_gated, recs, editor=editor, gen_prompts=1, gen_tokens=4, progress=False)
    frame = ev.to_frame()
    assert list(frame["condition"]) == ["unedited", "ROME", "unedited", "ROME"]
    summ = ev.summary()
    assert list(summ.columns[:8]) == list(METRICS) and list(summ.index) == ["unedited", "ROME"]
    assert (summ["n"] == 2).all()
    assert model_fingerprint(tiny_gated) == fp  # every edit was undone
    md = ev.to_markdown()
    assert "| unedited |" in md and "ES" in md
    assert ev.to_markdown(columns=["S", "NS"]).splitlines()[0] == "| | S | NS |"
    assert list(published_table().columns) == list(METRICS)
    # one record at a time: the same rows (timings aside)
    rows = evaluate_record(tiny_gated, recs[1], editor=editor, gen_prompts=1, gen_tokens=4)
    assert len(rows) == 2
    for row, want in zip(rows, frame.iloc[2:].to_dict(orient="records")):
        assert {k: v for k, v in row.items() if not k.endswith("_s")} == {k: want[k] for k in row if not k.endswith("_s")}
    # the edited metrics beside the unedited ones, per case
    paired = ev.paired_frame()
    assert list(paired["case_id"]) == [0, 1]
    for m in ("ES", "PS", "NS"):
        assert list(paired[m]) == list(frame[frame["condition"] == "ROME"][m])
        assert list(paired[f"{m}_before"]) == list(frame[frame["condition"] == "unedited"][m])
    import matplotlib.pyplot as plt

    fig = ev.plot(title="t")
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 2 * 4  # S, ES, PS, NS per condition
    plt.close(fig)


def test_rome_editor_samples_prefixes_once(tiny_gated, monkeypatch):
    import kvmem.evaluation as evaluation

    calls = []
    real = evaluation.context_prefixes
    monkeypatch.setattr(evaluation, "context_prefixes", lambda *a, **k: calls.append(1) or real(*a, **k))
    hp = RomeHparams(prefixes=((3, 1),), v_num_grad_steps=3, mom2_adjustment=False, layer=1)
    editor = rome_editor(tiny_gated, hparams=hp)
    edits = [editor(tiny_gated, r) for r in (_record(0), _record(1))]
    assert len(calls) == 1 and all(e.layer == 1 for e in edits)
    want = compute_rome_edit(tiny_gated, _record(0).request, hparams=hp, prefixes=real(tiny_gated, hp))
    torch.testing.assert_close(edits[0].delta(), want.delta(), rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="stats"):
        rome_editor(tiny_gated, hparams=RomeHparams(layer=1))
    with pytest.raises(InvalidArgumentError, match="stats"):  # the default editor: checked before any record
        evaluate_counterfact(tiny_gated, [_record(0)], hparams=RomeHparams(layer=1), progress=False)


def test_evaluate_counterfact_resumes_from_its_log(tiny_gated, tmp_path):
    hp = RomeHparams(prefixes=((3, 1),), v_num_grad_steps=3, mom2_adjustment=False, layer=1)
    recs = [_record(0), _record(1), _record(2)]
    kw = dict(hparams=hp, gen_prompts=1, gen_tokens=4, progress=False)
    full = evaluate_counterfact(tiny_gated, recs, **kw).to_frame()
    log = tmp_path / "cf.jsonl"
    evaluate_counterfact(tiny_gated, recs[:1], log=str(log), **kw)
    resumed = evaluate_counterfact(tiny_gated, recs, log=str(log), **kw).to_frame()
    assert len(log.read_text().splitlines()) == 1 + 3
    cols = [c for c in full.columns if not c.endswith("_s")]  # timings differ
    import pandas as pd

    pd.testing.assert_frame_equal(resumed[cols], full[cols], check_dtype=False)
    from kvmem.errors import RunLogError

    with pytest.raises(RunLogError, match="gen_tokens"):
        evaluate_counterfact(tiny_gated, recs, log=str(log), **{**kw, "gen_tokens": 5})


def test_evaluate_counterfact_with_a_null_space(tiny_gated, tmp_path):
    """null_space= constrains the default editor's every update to range P (AlphaEdit), is logged
    (a run with another P does not resume), and is refused where it cannot apply."""
    from kvmem.editing.nullspace import null_space
    from kvmem.errors import RunLogError

    d = int(tiny_gated.cfg.d_mlp)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(d // 2, d, generator=g, dtype=torch.float64)  # C of rank d/2: a null space of rank d/2
    ns = dataclasses.replace(null_space(keys.T @ keys / keys.shape[0], threshold=1e-8), layer=1)
    assert ns.rank == d - d // 2
    hp = RomeHparams(prefixes=((3, 1),), v_num_grad_steps=3, mom2_adjustment=False, layer=1)
    edit = rome_editor(tiny_gated, hparams=hp, null_space=ns)(tiny_gated, _record(0))
    delta = edit.delta().double()  # [d_mlp, d_model]: the update's input side is its rows
    assert float((delta - ns.P @ delta).norm()) <= 1e-9 * float(delta.norm())
    free = rome_editor(tiny_gated, hparams=hp)(tiny_gated, _record(0))
    assert float((free.delta().double() - ns.P @ free.delta().double()).norm()) > 1e-3 * float(free.delta().norm())

    recs = [_record(0), _record(1)]
    kw = dict(hparams=hp, gen_prompts=1, gen_tokens=4, progress=False)
    log = tmp_path / "ns.jsonl"
    first = evaluate_counterfact(tiny_gated, recs, null_space=ns, log=str(log), **kw).to_frame()
    again = evaluate_counterfact(tiny_gated, recs, null_space=ns, log=str(log), **kw).to_frame()
    assert list(first["ES"]) == list(again["ES"]) and list(first["NS"]) == list(again["NS"])
    other = dataclasses.replace(null_space(keys.T @ keys / keys.shape[0], threshold=1e-8, relative=True), layer=1)
    with pytest.raises(RunLogError, match="null_space"):
        evaluate_counterfact(tiny_gated, recs, null_space=other, log=str(log), **kw)
    with pytest.raises(InvalidArgumentError, match="layer 0's"):
        rome_editor(tiny_gated, hparams=hp, null_space=dataclasses.replace(ns, layer=0))
    with pytest.raises(InvalidArgumentError, match="default ROME editor"):
        evaluate_counterfact(tiny_gated, recs, editor=lambda m, r: edit, null_space=ns, **kw)


def test_evaluate_counterfact_records_rejected_edits(tiny_gpt2):
    bad = _record(5)
    bad = CounterFactRecord(**{**bad.__dict__, "request": Fact.from_template(
        "The twin city of {} is", "Beirut", target_true="Florence", target_new="Florence")})
    ev = evaluate_counterfact(tiny_gpt2, [bad], stats=torch.eye(64, dtype=torch.float64),
                              hparams=RomeHparams(prefixes=(), v_num_grad_steps=2, layer=1),
                              generation=False, progress=False)
    frame = ev.to_frame()
    assert "nothing to edit" in frame[frame["condition"] == "ROME"]["error"].iloc[0]
    assert ev.summary().loc["ROME", "n_failed"] == 1


def test_counterfact_file_scores(tiny_gpt2):
    recs = load_counterfact(shared_data("counterfact", "counterfact_dev_250.json"), limit=2)
    ev = evaluate_counterfact(tiny_gpt2, recs, editor=False, generation=False, progress=False)
    assert len(ev.to_frame()) == 2 and ev.summary().index.tolist() == ["unedited"]


def test_batch_editor_computes_a_failing_batch_once(tiny_gpt2, monkeypatch):
    """A batch whose edit is refused (here: every request already answered, found only after
    each v* fit) fails every record of the batch with the same error, computed once."""
    import kvmem.editing.memit as memit_module
    from kvmem.editing import MemitHparams
    from kvmem.evaluation import batch_editor

    calls = []

    def refuse(model, batch, **kwargs):
        calls.append(len(batch))
        raise InvalidArgumentError("Nothing to edit: every request was skipped")

    monkeypatch.setattr(memit_module, "compute_memit_edit", refuse)
    records = [_record(i) for i in range(3)]
    hp = MemitHparams(layers=(0, 1), value=RomeHparams(prefixes=((3, 1),), v_num_grad_steps=2))
    editor = batch_editor(tiny_gpt2, records, stats={}, hparams=hp, batch_size=3)
    for rec in records:
        with pytest.raises(InvalidArgumentError, match="Nothing to edit"):
            editor(tiny_gpt2, rec)
    assert calls == [3]
