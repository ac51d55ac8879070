"""Sequential-edit stress runs: the two ROME update variants, seeded and resumable runs, exact
restoration of the weights, duplicate/conflicting requests, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kvmem.editing import RomeHparams, compute_rome_edit, context_prefixes, second_moment
from kvmem.errors import DuplicateRequestError, EmptyTargetError, InvalidArgumentError, KvmemError, RunLogError
from kvmem.core.facts import Fact
from kvmem.pipelines.stress import check_requests, stress_edits
from kvmem.core.weights import mlp_weights
from reference import ENGLISH_SENTENCES  # tests/reference.py

LAYERS = (0, 1)
FAST = RomeHparams(prefixes=((3, 2),), v_num_grad_steps=3, seed=0)
CORPUS = ENGLISH_SENTENCES * 8
SUBJECTS = ["Alice Smith", "Bob Jones", "Carol White", "Dan Brown", "Eve Black", "Frank Green"]
NEW = [" Rome", " Paris", " Berlin", " Madrid", " Tokyo", " Cairo"]
REQUESTS = [Fact(f"{s} lives in the city of", s, target_true=" London", target_new=t, relation_id="city")
            for s, t in zip(SUBJECTS, NEW)]
NEIGHBOURS = [Fact("Zed Gray lives in the city of", "Zed Gray", target_true=" London")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stats(tiny_gpt2, tmp_path_factory):
    cache = tmp_path_factory.mktemp("stress-cache")
    return {l: second_moment(tiny_gpt2, l, CORPUS, n_tokens=600, cache_dir=cache, progress=False) for l in LAYERS}


def _run(model, stats, **kw):
    kw.setdefault("layers", 1)
    kw.setdefault("every", 2)
    return stress_edits(model, REQUESTS, stats=stats, hparams=FAST, neighbours=NEIGHBOURS, known=NEIGHBOURS,
                        gen_prompts=["The city"], gen_tokens=6, progress=False, **kw)


def _weights(model):
    return [mlp_weights(model, l).W_out.detach().clone() for l in range(model.cfg.n_layers)]


def test_rome_update_key_variants(tiny_gpt2, stats):
    """'averaged' (r-ROME) maps the prefix-averaged k* to v*; 'prompt' (ROME's code) maps the
    plain prompt's key; both share u and δ, so their Λ differ only by the denominator."""
    C = stats[1]
    prefixes = context_prefixes(tiny_gpt2, FAST)
    ea = compute_rome_edit(tiny_gpt2, REQUESTS[0], layer=1, stats=C, hparams=FAST, prefixes=prefixes)
    hp = RomeHparams(**{**FAST.__dict__, "update_key": "prompt"})
    ep = compute_rome_edit(tiny_gpt2, REQUESTS[0], layer=1, stats=C, hparams=hp, prefixes=prefixes)
    W = mlp_weights(tiny_gpt2, 1)
    for e in (ea, ep):
        got = e.k_star @ (W.W_out.double() + e.delta()) + W.b_out.double()
        torch.testing.assert_close(got, e.v_star, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(ea.u, ep.u)
    assert not torch.equal(ea.k_star, ep.k_star)  # plain-prompt key differs from the average
    ratio = (ea.lam / ep.lam)
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ep.u @ ep.k_star / (ea.u @ ea.k_star))))
    with pytest.raises((InvalidArgumentError, TypeError), match="update_key|averaged"):  # beartype may see it first
        RomeHparams(update_key="other")


def test_stress_restores_weights_and_reports(tiny_gpt2, stats):
    before = _weights(tiny_gpt2)
    res = _run(tiny_gpt2, stats, method="rome", layers=list(LAYERS))
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(tiny_gpt2)))
    df = res.to_frame()
    assert list(df["step"]) == [0, 2, 4, 6]
    assert res.n_applied + res.n_skipped == len(REQUESTS)
    st = res.steps_frame()
    assert set(st.loc[st["skipped"].isna() if "skipped" in st else st.index, "layer"]) <= set(LAYERS)
    assert {"retention", "neighborhood_acc", "known_acc", "gen_entropy", "w_delta_rel_L1"} <= set(df.columns)
    assert df.loc[0, "retention"] != df.loc[0, "retention"]  # NaN: nothing applied yet
    assert (df["w_delta_rel_L1"].iloc[1:] > 0).all()
    fig = res.plot()
    assert len(fig.axes) == 4


def test_stress_is_seeded_and_restore_false_keeps_edits(tiny_gpt2, stats):
    before = _weights(tiny_gpt2)
    a = _run(tiny_gpt2, stats, restore=False)
    after_a = _weights(tiny_gpt2)
    assert not torch.equal(after_a[1], before[1])
    with torch.no_grad():
        mlp_weights(tiny_gpt2, 1).W_out.copy_(before[1])
    tiny_gpt2._kvmem_edit_stack.clear()
    b = _run(tiny_gpt2, stats)
    assert a.to_frame().equals(b.to_frame())
    assert all(torch.equal(x, y) for x, y in zip(before, _weights(tiny_gpt2)))


def test_resume_equals_uninterrupted(tiny_gpt2, stats, tmp_path):
    before = _weights(tiny_gpt2)
    full = _run(tiny_gpt2, stats, method="rome", log=tmp_path / "full.jsonl", restore=False)
    w_full = _weights(tiny_gpt2)
    with torch.no_grad():
        mlp_weights(tiny_gpt2, 1).W_out.copy_(before[1])
    tiny_gpt2._kvmem_edit_stack.clear()

    log = tmp_path / "part.jsonl"
    with pytest.warns(UserWarning, match="stop_after"):
        part = _run(tiny_gpt2, stats, method="rome", log=log, stop_after=3)
    assert part.n_applied + part.n_skipped == 3
    # an interruption in the middle of writing a line leaves a torn line: it is dropped
    with log.open("a") as fh:
        fh.write('{"key": "step-3", "record": {"kind": "step", "step": 3, "ind')
    resumed = _run(tiny_gpt2, stats, method="rome", log=log, restore=False)
    assert resumed.resumed_from == 3
    assert resumed.to_frame().equals(full.to_frame())
    assert resumed.steps_frame().drop(columns="seconds").equals(full.steps_frame().drop(columns="seconds"))
    assert all(torch.equal(x, y) for x, y in zip(w_full, _weights(tiny_gpt2)))
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert sum(1 for r in lines[1:] if r["key"].startswith("step-")) == len(REQUESTS)
    with torch.no_grad():
        mlp_weights(tiny_gpt2, 1).W_out.copy_(before[1])
    tiny_gpt2._kvmem_edit_stack.clear()

    # a log from another setting is never silently continued
    with pytest.raises(RunLogError, match="method"):
        _run(tiny_gpt2, stats, method="r-rome", log=log)
    assert all(torch.equal(x, y) for x, y in zip(before, _weights(tiny_gpt2)))
    # ... unless asked to start over
    again = _run(tiny_gpt2, stats, method="r-rome", log=log, restart=True)
    assert again.resumed_from == 0 and again.n_applied + again.n_skipped == len(REQUESTS)
    assert all(torch.equal(x, y) for x, y in zip(before, _weights(tiny_gpt2)))


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_batched_methods_resume_equal_uninterrupted(tiny_gpt2, stats, tmp_path, method):
    """Batches of 2 over layers 0-1; AlphaEdit's earlier-edit keys are replayed from the log too,
    so a resumed run computes the later batches on the same weights and keys."""
    from kvmem.editing import MemitHparams

    before = _weights(tiny_gpt2)
    mh = MemitHparams(layers=LAYERS, value=FAST, mom2_update_weight=50.0, nullspace_threshold=1e-3,
                      nullspace_relative=True)
    kw = dict(method=method, layers=list(LAYERS), edit_batch=2, memit=mh)
    full = _run(tiny_gpt2, stats, log=tmp_path / "full.jsonl", restore=False, **kw)
    w_full = _weights(tiny_gpt2)
    assert full.n_applied + full.n_skipped == len(REQUESTS) and full.n_applied > 0
    assert [c["step"] for c in full.checkpoints] == [0, 2, 4, 6]
    with torch.no_grad():
        for l in LAYERS:
            mlp_weights(tiny_gpt2, l).W_out.copy_(before[l])
    with pytest.warns(UserWarning, match="stop_after"):
        _run(tiny_gpt2, stats, log=tmp_path / "part.jsonl", stop_after=2, **kw)
    assert all(torch.equal(x, y) for x, y in zip(before, _weights(tiny_gpt2)))
    resumed = _run(tiny_gpt2, stats, log=tmp_path / "part.jsonl", restore=False, **kw)
    assert resumed.resumed_from == 2
    assert all(torch.equal(x, y) for x, y in zip(w_full, _weights(tiny_gpt2)))
    assert resumed.to_frame().equals(full.to_frame())
    with torch.no_grad():
        for l in LAYERS:
            mlp_weights(tiny_gpt2, l).W_out.copy_(before[l])


LEGACY_LOG = Path(__file__).parent / "data" / "stress_log_v1.jsonl"


def _legacy_run(model, log, **kw):
    """The call that wrote tests/data/stress_log_v1.jsonl with kvmem's first stress-log writer
    (commit 91b64de, `stop_after=3` of 4 factworld edits): 3 edits and 2 checkpoints logged."""
    from kvmem.factworld import counterfact_records

    recs = counterfact_records(n=40)
    requests = [r.request for r in recs[::10]][:4]
    known = [r.request for r in recs[1:40:10]]
    hp = RomeHparams(layer=0, prefixes=((3, 2),), v_num_grad_steps=3, mom2_adjustment=False, seed=0)
    return stress_edits(model, requests, hparams=hp, layers=0, every=2, known=known,
                        gen_prompts=[requests[0].prompt], gen_tokens=4, log=log, progress=False, **kw)


def test_first_format_log_resumes(factworld, tmp_path):
    """A stress log written before stress logs were `RunLog`s still resumes: it is converted (same
    settings, prefixes, edits and checkpoints) and the run continues after its last edit."""
    import shutil

    from kvmem.runs import log_settings

    legacy = [json.loads(l) for l in LEGACY_LOG.read_text().splitlines()]
    log = tmp_path / "old.jsonl"
    shutil.copy(LEGACY_LOG, log)
    before = _weights(factworld)
    res = _legacy_run(factworld, log)
    assert res.resumed_from == 3 and len(res.steps) == 4
    assert [c["step"] for c in res.checkpoints] == [0, 2, 4]
    logged_ckpts = [r["metrics"] for r in legacy if r["kind"] == "checkpoint"]
    assert json.dumps(list(res.checkpoints[:2])) == json.dumps(logged_ckpts)  # read back, not recomputed
    assert [s["subject"] for s in res.steps[:3]] == [r["subject"] for r in legacy if r["kind"] == "step"]
    assert log_settings(log) == legacy[0]["config"]
    assert all(torch.equal(x, y) for x, y in zip(before, _weights(factworld)))
    # the converted log is a RunLog: a second call reads everything back
    again = _legacy_run(factworld, log)
    assert again.resumed_from == 4 and json.dumps(list(again.checkpoints)) == json.dumps(list(res.checkpoints))


def test_duplicates_and_conflicts(tiny_gpt2, stats):
    dup = REQUESTS[:3] + [REQUESTS[0]]
    conflict = REQUESTS[:3] + [Fact(REQUESTS[1].prompt, REQUESTS[1].subject, target_new=" Oslo", relation_id="city")]
    with pytest.raises(DuplicateRequestError, match="duplicate of request 0"):
        check_requests(dup)
    with pytest.raises(DuplicateRequestError, match="conflicts with request 1"):
        stress_edits(tiny_gpt2, conflict, stats=stats[1], layers=1, hparams=FAST, progress=False)
    keep, skipped = check_requests(conflict, on_conflict="skip")
    assert keep == [0, 1, 2] and skipped[0]["index"] == 3
    res = stress_edits(tiny_gpt2, conflict, stats=stats[1], layers=1, hparams=FAST, every=5, on_conflict="skip",
                       progress=False)
    st = res.steps_frame()
    assert "conflicts" in st.loc[st["index"] == 3, "skipped"].item()


def test_bad_input(tiny_gpt2, stats):
    with pytest.raises(InvalidArgumentError, match="No edit requests"):
        stress_edits(tiny_gpt2, [], stats=stats[1], layers=1)
    with pytest.raises(EmptyTargetError):
        stress_edits(tiny_gpt2, [REQUESTS[0].__class__("A b c", "A")], stats=stats[1], layers=1)
    with pytest.raises(InvalidArgumentError, match="method"):
        stress_edits(tiny_gpt2, REQUESTS, stats=stats[1], layers=1, method="pmet")
    with pytest.raises(InvalidArgumentError, match="edit_batch"):
        stress_edits(tiny_gpt2, REQUESTS, stats=stats[1], layers=1, method="rome", edit_batch=2)
    with pytest.raises(InvalidArgumentError, match="each"):
        stress_edits(tiny_gpt2, REQUESTS, stats=stats[1], layers=[0, 1], hparams=FAST)
    with pytest.raises(InvalidArgumentError, match="no entry for edit layer 2"):
        stress_edits(tiny_gpt2, REQUESTS, stats=stats, layers=[1, 2], hparams=FAST)
    with pytest.raises(KvmemError):
        stress_edits(tiny_gpt2, REQUESTS, stats=stats[1], layers=7, hparams=FAST)
    with pytest.raises(InvalidArgumentError, match="every"):
        stress_edits(tiny_gpt2, REQUESTS, stats=stats[1], layers=1, every=0)
    # statistics of other weights are refused (passed on as plain tensors, no later check sees them)
    from conftest import build_tiny
    from kvmem.errors import ModelMismatchError

    other = second_moment(build_tiny("gpt2", seed=1), 1, CORPUS, n_tokens=600, use_cache=False, progress=False)
    with pytest.raises(ModelMismatchError):
        stress_edits(tiny_gpt2, REQUESTS, stats=other, layers=1, hparams=FAST)
    # MEMIT needs C whatever its v* settings say: refused up front, not batch by batch
    from kvmem.editing import MemitHparams

    no_c = MemitHparams(layers=LAYERS, value=dataclasses.replace(FAST, mom2_adjustment=False))
    with pytest.raises(InvalidArgumentError, match="stats are needed"):
        stress_edits(tiny_gpt2, REQUESTS, stats=None, layers=list(LAYERS), method="memit", memit=no_c)
