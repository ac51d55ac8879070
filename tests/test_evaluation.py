"""CounterFact metrics: scores equal plain forwards, ROME's n-gram entropy, the table, the bench."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import shared_data
from kvmem.data import CounterFactRecord, load_counterfact
from kvmem.editing import RomeHparams, compute_rome_edit, model_fingerprint
from kvmem.evaluation import (
    METRICS,
    evaluate_counterfact,
    ngram_entropy,
    published_table,
    record_metrics,
    target_logprobs,
)
from kvmem.core.facts import Fact
from kvmem.core.tokenize import encode, target_token_ids

ROOT = Path(__file__).resolve().parents[1]


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
    assert list(published_table().columns) == list(METRICS)


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
    from kvmem.runs import RunLogError

    with pytest.raises(RunLogError, match="gen_tokens"):
        evaluate_counterfact(tiny_gated, recs, log=str(log), **{**kw, "gen_tokens": 5})


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


def test_bench_script_end_to_end_tiny(tmp_path):
    shared_data("counterfact", "counterfact_dev_250.json")
    shared_data("corpus", "wiki_vital_en.txt")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_editing
    finally:
        sys.path.pop(0)
    out = tmp_path / "editing"
    res = bench_editing.main([
        "--models", "tiny", "--n-records", "2", "--stats-tokens", "1500", "--throughput-tokens", "500",
        "--layer", "1", "--gen-prompts", "1", "--gen-tokens", "3", "--cache-dir", str(tmp_path / "c"),
        "--out", str(out), "--quiet",
    ])
    data = json.loads(Path(f"{out}.json").read_text())
    r = data["results"][0]
    assert r["stats"]["n_tokens"] == 1500 and r["records"]["n"] == 2
    assert set(r["summary"]) == {"unedited", "ROME"}
    assert "ES" in Path(f"{out}.md").read_text()
    assert res[0]["edit_s_mean"] > 0

    # the same records in two shards (as parallel workers would), merged: the same table
    common = ["--models", "tiny", "--n-records", "2", "--stats-tokens", "1500", "--throughput-tokens", "500",
              "--layer", "1", "--gen-prompts", "1", "--gen-tokens", "3", "--cache-dir", str(tmp_path / "c"),
              "--out", str(tmp_path / "sharded"), "--quiet"]
    for i in range(2):
        shard = bench_editing.main(common + ["--shard", f"{i}/2"])
        assert shard[0]["records"]["n"] == 1 and not Path(f"{tmp_path / 'sharded'}.json").exists()
    bench_editing.main(common + ["--merge", "2"])
    merged = json.loads(Path(f"{tmp_path / 'sharded'}.json").read_text())["results"][0]
    assert merged["records"]["n"] == 2
    for cond in ("unedited", "ROME"):
        for m in ("ES", "PS", "NS", "EM", "NM"):
            assert merged["summary"][cond][m] == pytest.approx(r["summary"][cond][m], abs=1e-9), (cond, m)


def test_neighbourhood_ablation_script_tiny(tmp_path, monkeypatch):
    """The NS ablation's reference condition equals a plain ROME edit measured by record_metrics;
    a rerun resumes from its log."""
    import dataclasses

    from kvmem.editing import compute_rome_edit, context_prefixes, edited, rome_hparams, second_moment
    from kvmem.evaluation import record_metrics

    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path / "cache"))
    cf = shared_data("counterfact", "counterfact_dev_250.json")
    corpus = shared_data("corpus", "wiki_vital_en.txt")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_editing
        import editing_neighbourhood
    finally:
        sys.path.pop(0)
    args = ["--model", "tiny", "--n-records", "1", "--layers", "1", "--stats-tokens", "1500", "3000",
            "--strengths", "0.5", "--threads", "1", "--out", str(tmp_path / "nb"), "--quiet"]
    res = editing_neighbourhood.main(args)
    table = res["summary"]["table"]
    assert set(table) == {"unedited", "L1 C 1k", "L1 C 3k", "L1 no C (u = k*)", "L1 C 1k x0.5"}

    model = bench_editing.load("tiny")
    rec = load_counterfact(cf, limit=1)[0]
    sm = second_moment(model, 1, str(corpus), n_tokens=1500, progress=False)
    hp = dataclasses.replace(rome_hparams(model), layer=1)
    edit = compute_rome_edit(model, rec.request, layer=1, stats=sm, hparams=hp, prefixes=context_prefixes(model, hp))
    plain = record_metrics(model, rec, generation=False)
    with edited(model, edit):
        after = record_metrics(model, rec, generation=False)
    for k in ("ES", "PS", "NS"):
        assert table["unedited"][k] == pytest.approx(100 * plain[k])
        assert table["L1 C 1k"][k] == pytest.approx(100 * after[k])
    assert table["L1 C 1k x0.5"]["norm dW"] == pytest.approx(table["L1 C 1k"]["norm dW"] / 2, rel=1e-6)
    lines = len(Path(f"{tmp_path / 'nb'}.jsonl").read_text().splitlines())
    again = editing_neighbourhood.main(args)
    assert json.dumps(again["summary"]) == json.dumps(res["summary"])
    assert len(Path(f"{tmp_path / 'nb'}.jsonl").read_text().splitlines()) == lines == 2


def test_bench_script_on_factworld(tmp_path):
    _factworld_or_skip()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_editing
    finally:
        sys.path.pop(0)
    out = tmp_path / "editing"
    res = bench_editing.main([
        "--models", "factworld", "--n-records", "3", "--stats-tokens", "3000", "--throughput-tokens", "500",
        "--gen-tokens", "0", "--cache-dir", str(tmp_path / "c"), "--out", str(out), "--quiet",
    ])
    assert res[0]["records"]["n"] == 3


def _factworld_or_skip():
    fw = pytest.importorskip("kvmem.factworld", reason="the fact world is not built yet")
    try:
        return fw.factworld_hooked_transformer(), fw.shipped_world()
    except Exception as e:  # weights not shipped yet
        pytest.skip(f"the fact-world model does not load yet ({type(e).__name__}: {e})")
