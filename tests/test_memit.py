"""MEMIT, AlphaEdit's null space and edit sessions: the algebra against independent references
(ROME's closed form through Sherman–Morrison, a null space built by construction), the stated
output bound on factworld, bit-exact restoration, saved and resumed sessions, and bad input."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import build_tiny

from kvmem.core.facts import Fact
from kvmem.core.hooks import capture
from kvmem.core.tokenize import encode
from kvmem.core.weights import hook_post_name, mlp_weights
from kvmem.editing import (
    EditSession,
    MemitHparams,
    MultiLayerEdit,
    RomeHparams,
    apply_edit,
    compute_memit_edit,
    compute_rome_edit,
    context_prefixes,
    edited,
    load_edit,
    model_fingerprint,
    null_space,
    second_moment,
    solve_update,
)
from kvmem.errors import (DuplicateRequestError, InvalidArgumentError, LayerOutOfRangeError, ModelMismatchError,
                          SingularStatisticsError)
from reference import ENGLISH_SENTENCES  # tests/reference.py

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = RomeHparams(prefixes=((4, 2),), v_num_grad_steps=4, seed=0)
CORPUS = [
    "A small village lies at the foot of the hills, where farmers grow wheat and barley.",
    "The museum reopened after a long renovation, showing paintings from the last three centuries.",
    "Engineers tested the new bridge with heavy trucks before it opened to traffic in spring.",
    *ENGLISH_SENTENCES,
] * 8
REQUEST = Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", target_true="Paris", target_new="Rome")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_tiny("gpt2", seed=0)
    cache = tmp_path_factory.mktemp("stats")
    stats = {l: second_moment(model, l, CORPUS, n_tokens=1000, cache_dir=cache, progress=False) for l in (0, 1)}
    return model, stats


def _weights(model, layers):
    return {l: mlp_weights(model, l).W_out.detach().clone() for l in layers}


def test_memit_one_request_one_layer_is_rome_shrunk_by_sherman_morrison(tiny):
    """(λC + kkᵀ)⁻¹k = C⁻¹k/(λ + s), s = kᵀC⁻¹k: MEMIT's update is s/(λ+s) times ROME's (same δ)."""
    model, stats = tiny
    prefixes = context_prefixes(model, FAST)
    rome = compute_rome_edit(model, REQUEST, layer=1, stats=stats[1], hparams=FAST, prefixes=prefixes)
    k = rome.k_star.double()
    s = float(k @ torch.linalg.solve(stats[1].C, k))
    for lam in (1e-6 * s, 0.5 * s, 20.0 * s):
        memit = compute_memit_edit(model, [REQUEST], stats=stats, layers=[1], prefixes=prefixes,
                                   hparams=MemitHparams(value=FAST, mom2_update_weight=lam))
        assert isinstance(memit, MultiLayerEdit) and memit.layers == (1,)
        want = rome.delta() * (s / (lam + s))
        got = memit.delta(0)
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6 * float(want.abs().max())), lam


def test_memit_through_a_post_mlp_norm_delivers_the_target(tiny_postnorm, tmp_path):
    """Gemma-like blocks: the residual target is passed back through the post-MLP norm (first
    order); with a small λ the update then closes most of the gap between z and the residual."""
    model = tiny_postnorm
    stats = {l: second_moment(model, l, CORPUS, n_tokens=1000, cache_dir=tmp_path, progress=False) for l in (0, 1)}
    e = compute_memit_edit(model, [REQUEST], stats=stats, layers=[0, 1],
                           hparams=MemitHparams(value=FAST, mom2_update_weight=1e-3))
    assert e.residual["z_gap"] > 0 and e.residual["after"] < 0.25, e.residual


def test_memit_through_a_post_mlp_norm_with_a_zero_gain(tiny_postnorm, tmp_path, monkeypatch):
    """Gemma-3-270m's post-feedforward norms have gains of exactly 0 at layers 3 and 4: the residual
    target is passed back through them by the pseudo-inverse (those dimensions left out), not
    divided by zero, which made every update after the first NaN."""
    import kvmem.editing.memit as memit

    model = tiny_postnorm
    real = memit.norm_gain

    def with_zeros(m, norm):
        g = real(m, norm)
        if g is None:
            return g
        g = g.detach().clone()
        g[:3] = 0.0
        return g

    monkeypatch.setattr(memit, "norm_gain", with_zeros)
    stats = {l: second_moment(model, l, CORPUS, n_tokens=1000, cache_dir=tmp_path, progress=False) for l in (0, 1)}
    e = compute_memit_edit(model, [REQUEST], stats=stats, layers=[0, 1],
                           hparams=MemitHparams(value=FAST, mom2_update_weight=1e-3))
    assert all(bool(torch.isfinite(t).all()) for t in (*e.U, *e.V))
    assert all(float(v[:, :3].abs().max()) == 0.0 for v in e.V)  # the unreachable dimensions
    assert e.residual["after"] < 0.5, e.residual


def test_memit_spread_by_gain(tiny, tiny_postnorm, tmp_path):
    """spread="gain" shares the residual gap by each layer's post-MLP norm gain ‖g‖: without such
    norms every share is 1, so it is MEMIT's equal spread bit for bit; with them it still delivers."""
    model, stats = tiny
    prefixes = context_prefixes(model, FAST)
    kw = dict(stats=stats, layers=[0, 1], prefixes=prefixes)
    equal = compute_memit_edit(model, [REQUEST], hparams=MemitHparams(value=FAST, mom2_update_weight=1.0), **kw)
    gain = compute_memit_edit(model, [REQUEST], hparams=MemitHparams(value=FAST, mom2_update_weight=1.0, spread="gain"), **kw)
    assert all(torch.equal(a, b) for a, b in zip(equal.V, gain.V))
    post = tiny_postnorm
    stats = {l: second_moment(post, l, CORPUS, n_tokens=1000, cache_dir=tmp_path, progress=False) for l in (0, 1)}
    e = compute_memit_edit(post, [REQUEST], stats=stats, layers=[0, 1],
                           hparams=MemitHparams(value=FAST, mom2_update_weight=1e-3, spread="gain"))
    assert e.hparams.spread == "gain" and e.residual["after"] < 0.25, e.residual
    with pytest.raises(InvalidArgumentError, match="spread"):
        MemitHparams(spread="layers")


def test_memit_value_cache_fits_each_request_once(tiny, monkeypatch):
    import kvmem.editing.memit as memit

    model, stats = tiny
    calls = []
    real = memit.fit_value
    monkeypatch.setattr(memit, "fit_value", lambda *a, **k: calls.append(a[1].prompt) or real(*a, **k))
    prefixes = context_prefixes(model, FAST)
    cache = {}
    a = compute_memit_edit(model, [REQUEST], stats=stats, layers=[0, 1], prefixes=prefixes, value_cache=cache,
                           hparams=MemitHparams(value=FAST, mom2_update_weight=1.0))
    b = compute_memit_edit(model, [REQUEST], stats=stats, layers=[1], prefixes=prefixes, value_cache=cache,
                           hparams=MemitHparams(value=FAST, mom2_update_weight=1.0))
    assert len(calls) == 1 and len(cache) == 1  # same last layer, same v*
    assert torch.equal(a.targets, b.targets)
    compute_memit_edit(model, [REQUEST], stats=stats, layers=[1], prefixes=prefixes, value_cache=cache,
                       hparams=MemitHparams(value=dataclasses.replace(FAST, v_num_grad_steps=3), mom2_update_weight=1.0))
    assert len(calls) == 2  # other value settings: fitted again


def test_null_space_projection_by_construction():
    """C = KᵀK/N with K of rank r: the eigenvalue-threshold projection has rank d − r, kills the
    span of K and leaves its orthogonal complement unchanged."""
    g = torch.Generator().manual_seed(0)
    d, r = 40, 25
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    K = torch.randn(500, r, generator=g, dtype=torch.float64) @ basis[:, :r].T * 3.0
    ns = null_space(K.T @ K / K.shape[0], threshold=1e-6)
    assert ns.rank == d - r
    assert torch.allclose(ns.P, ns.P.T) and torch.allclose(ns.P @ ns.P, ns.P, atol=1e-10)
    assert float(ns.leak(K).max()) < 1e-8  # ‖Pk‖ ≈ 0 for keys in the preserved span
    free = basis[:, r:].T  # the null space: P leaves it unchanged
    assert torch.allclose(free @ ns.P, free, atol=1e-10)
    # AlphaEdit's threshold is absolute; relative=True scales it by the largest eigenvalue
    rel = null_space(K.T @ K / K.shape[0], threshold=1e-9, relative=True)
    assert rel.rank == d - r and rel.relative


def test_solve_update_against_woodbury_and_the_null_space():
    """MEMIT's U = (λC + KᵀK)⁻¹Kᵀ equals the Woodbury form C⁻¹Kᵀ(λI + KC⁻¹Kᵀ)⁻¹; AlphaEdit's U lies in
    P's range (so ΔW = U R cannot move a key in C's preserved span) and solves its normal equation."""
    g = torch.Generator().manual_seed(1)
    d, n, r = 30, 6, 20
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    X = torch.randn(400, d, generator=g, dtype=torch.float64)
    C = X.T @ X / 400
    K = torch.randn(n, d, generator=g, dtype=torch.float64)
    hp = MemitHparams(layers=(0,), mom2_update_weight=7.0)
    U = solve_update(K.float(), C, hp)
    Ci = torch.linalg.inv(C)
    woodbury = Ci @ K.T @ torch.linalg.inv(7.0 * torch.eye(n, dtype=torch.float64) + K @ Ci @ K.T)
    assert U.dtype == torch.float64 and torch.allclose(U, woodbury.to(U.dtype), atol=1e-6, rtol=1e-5)

    low = torch.randn(400, r, generator=g, dtype=torch.float64) @ basis[:, :r].T
    P = null_space(low.T @ low / 400, threshold=1e-8).P
    Kp = torch.randn(3, d, generator=g, dtype=torch.float64)
    ahp = dataclasses.replace(hp, null_space=True, l2=0.5)
    U = solve_update(K, C, ahp, P=P, prev_keys=Kp.T @ Kp)
    assert torch.allclose(P @ U, U, atol=1e-10)
    assert float((low @ U).abs().max()) < 1e-8
    lhs = P @ (K.T @ K + Kp.T @ Kp) @ U + 0.5 * U
    assert torch.allclose(lhs, P @ K.T, atol=1e-10)
    with pytest.raises(InvalidArgumentError, match="null-space projector"):
        solve_update(K, C, ahp)


def _corpus_keys(model, layer, sentences):
    got, out = {}, []
    with torch.no_grad(), model.hooks(fwd_hooks=[(hook_post_name(model, layer), capture(got, "k"))]):
        for s in sentences:
            model(torch.tensor([encode(model, s)]))
            out.append(got["k"][0, 1:].double())
    return torch.cat(out)


def test_alphaedit_moves_preserved_keys_by_at_most_the_bound(factworld, world, tmp_path):
    model = factworld
    sents = [world.sentence(p.subject, p.relation, p.template) for p in world.all_prompts("train")]
    random.Random(0).shuffle(sents)
    stats = {l: second_moment(model, l, sents, n_tokens=8_000, cache_dir=tmp_path, progress=False) for l in (0, 1)}
    facts = world.facts("train")[:2]
    reqs = [Fact(f.prompt, f.subject, target_true=f.target, relation_id=f.relation,
                 target_new=next(o for o in world.relation(f.relation).objects if o != f.target)) for f in facts]
    hp = MemitHparams(layers=(0, 1), value=RomeHparams(prefixes=((5, 2),), v_num_grad_steps=5), null_space=True,
                      nullspace_threshold=1e-2, nullspace_relative=True)
    e = compute_memit_edit(model, reqs, stats=stats, hparams=hp)
    held = _corpus_keys(model, 0, sents[-40:])  # text keys of the same distribution as C's
    for j, l in enumerate(e.layers):
        ns = null_space(stats[l], threshold=1e-2, relative=True)
        assert 0 < ns.rank < model.cfg.d_mlp
        dW = e.delta(j)
        keys = held if l == 0 else _corpus_keys(model, 1, sents[-40:])
        change = (keys @ dW).norm(dim=-1)
        bound = (keys @ ns.P).norm(dim=-1) * torch.linalg.matrix_norm(dW, ord=2)
        assert bool((change <= bound * (1 + 1e-6) + 1e-9).all())
    # and it is a real constraint: the same solve with P = I (every eigenvalue under the threshold)
    # inserts as strongly and moves these keys much more
    free = compute_memit_edit(model, reqs, stats=stats, hparams=dataclasses.replace(hp, nullspace_threshold=10.0))
    moved_alpha = float((held @ e.delta(0)).norm(dim=-1).mean())
    moved_memit = float((held @ free.delta(0)).norm(dim=-1).mean())
    assert moved_alpha < 0.5 * moved_memit


def test_memit_edit_applies_restores_saves_and_loads(tiny, tmp_path):
    model, stats = tiny
    reqs = [REQUEST, Fact("Paris is the capital of", "Paris", target_true="France", target_new="Spain")]
    e = compute_memit_edit(model, reqs, stats=stats, layers=[0, 1], hparams=MemitHparams(value=FAST, mom2_update_weight=50.0))
    assert e.layers == (0, 1) and e.n_requests == 2 and e.U[0].shape == (model.cfg.d_mlp, 2)
    assert e.residual["after"] < 1.0
    before = _weights(model, (0, 1))
    fp = model_fingerprint(model)
    with edited(model, e):
        assert not torch.equal(mlp_weights(model, 0).W_out, before[0])
        assert not torch.equal(mlp_weights(model, 1).W_out, before[1])
    assert all(torch.equal(mlp_weights(model, l).W_out, before[l]) for l in (0, 1))
    path = e.save(tmp_path / "m.safetensors")
    back = load_edit(path)
    assert isinstance(back, MultiLayerEdit) and back.layers == e.layers and back.hparams == e.hparams
    assert all(torch.equal(a, b) for a, b in zip(back.U, e.U))
    # a ROME edit still loads through the same function
    rome = compute_rome_edit(model, REQUEST, layer=1, stats=stats[1], hparams=FAST)
    assert load_edit(rome.save(tmp_path / "r.safetensors")).layer == 1
    apply_edit(model, back)
    try:
        with pytest.raises(ModelMismatchError):  # computed on the unedited weights, applied twice over another edit
            apply_edit(model, rome.__class__(**{**rome.__dict__, "model_fingerprint": "x" * 64, "weights_fingerprint": None}))
    finally:
        with torch.no_grad():
            for l, W in before.items():
                mlp_weights(model, l).W_out.copy_(W)
        model._kvmem_edit_stack.clear()
    assert model_fingerprint(model) == fp


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_session_restores_bit_exactly_and_resumes(tiny, tmp_path, method):
    model, stats = tiny
    before = _weights(model, (0, 1))
    hp = FAST if method == "rome" else MemitHparams(layers=(0, 1), value=FAST, mom2_update_weight=50.0,
                                                    nullspace_threshold=1e-3, nullspace_relative=True)
    s = EditSession(model, method, stats=stats, hparams=hp, layers=[1] if method == "rome" else None)
    batches = [[REQUEST], [Fact("Paris is the capital of", "Paris", target_true="France", target_new="Spain"),
                           Fact("Rivers flow into the", "Rivers", target_true="sea", target_new="desert")]]
    s.apply(batches[0])
    s.save(tmp_path / "run")
    s.apply(batches[1])
    after_two = _weights(model, (0, 1))
    kp = {l: t.clone() for l, t in s.prev_keys.items()}
    assert (method != "alphaedit") or all(float(t.abs().sum()) > 0 for t in kp.values())
    msg = s.restore()
    assert "reset" in msg and s.n_edits == 0 and all(float(t.abs().sum()) == 0 for t in s.prev_keys.values())
    assert all(torch.equal(mlp_weights(model, l).W_out, before[l]) for l in (0, 1))
    # resume from the saved first batch, continue: the same weights and keys as without the break
    r = EditSession.resume(model, tmp_path / "run", stats=stats)
    r.apply(batches[1])
    assert all(torch.equal(mlp_weights(model, l).W_out, after_two[l]) for l in (0, 1))
    assert all(torch.equal(r.prev_keys[l], kp[l]) for l in kp)
    # a fresh session holds no keys of another's edits
    r.restore()
    fresh = EditSession(model, method, stats=stats, hparams=hp, layers=[1] if method == "rome" else None)
    assert fresh.n_edits == 0 and all(float(t.abs().sum()) == 0 for t in fresh.prev_keys.values())
    assert all(torch.equal(mlp_weights(model, l).W_out, before[l]) for l in (0, 1))


def test_bad_batches(tiny):
    model, stats = tiny
    hp = MemitHparams(layers=(0, 1), value=FAST, mom2_update_weight=50.0)
    before = _weights(model, (0, 1))
    other = Fact(REQUEST.prompt, REQUEST.subject, target_true="Paris", target_new="Berlin")
    with pytest.raises(DuplicateRequestError, match="requests 0 and 2"):
        compute_memit_edit(model, [REQUEST, Fact("Paris is the capital of", "Paris", target_new="Spain"), other],
                           stats=stats, hparams=hp)
    e = compute_memit_edit(model, [REQUEST, REQUEST], stats=stats, hparams=hp)
    assert e.n_requests == 1 and e.skipped[0]["index"] == 1 and "duplicate of request 0" in e.skipped[0]["skipped"]
    with pytest.raises(InvalidArgumentError, match="Empty batch"):
        compute_memit_edit(model, [], stats=stats, hparams=hp)
    with pytest.raises(LayerOutOfRangeError):
        compute_memit_edit(model, [REQUEST], stats=stats, layers=[1, 7], hparams=hp)
    with pytest.raises(InvalidArgumentError, match="no C for edit layer"):
        compute_memit_edit(model, [REQUEST], stats={1: stats[1]}, hparams=hp)
    zeros = {l: torch.zeros(model.cfg.d_mlp, model.cfg.d_mlp, dtype=torch.float64) for l in (0, 1)}
    with pytest.raises(SingularStatisticsError):  # MEMIT solves λC + KᵀK: refused before any work
        compute_memit_edit(model, [REQUEST], stats=zeros, hparams=hp)
    foreign = build_tiny("gpt2", seed=1)
    with pytest.raises(ModelMismatchError):
        compute_memit_edit(foreign, [REQUEST], stats=stats, hparams=hp)
    with pytest.raises(ModelMismatchError):
        EditSession(foreign, "alphaedit", stats=stats, hparams=hp)
    assert all(torch.equal(mlp_weights(model, l).W_out, before[l]) for l in (0, 1))


def test_already_satisfied_requests_are_skipped_with_the_reason(factworld, world):
    # a trained model, so its greedy answer is a word (a random model's need not be)
    model = factworld
    f0, f1 = world.facts("train")[:2]
    done = Fact(f0.prompt, f0.subject, target_new=f0.target, relation_id=f0.relation)  # what it answers now
    todo = Fact(f1.prompt, f1.subject, target_true=f1.target, relation_id=f1.relation,
                target_new=next(o for o in world.relation(f1.relation).objects if o != f1.target))
    eye = {l: torch.eye(model.cfg.d_mlp, dtype=torch.float64) for l in (0, 1)}
    hp = MemitHparams(layers=(0, 1), value=FAST, mom2_update_weight=1.0)
    e = compute_memit_edit(model, [done, todo], stats=eye, hparams=hp)
    assert [s["index"] for s in e.skipped] == [0] and "already satisfied" in e.skipped[0]["skipped"]
    assert e.n_requests == 1
    with pytest.raises(InvalidArgumentError, match="Nothing to edit"):
        compute_memit_edit(model, [done], stats=eye, hparams=hp)


def test_session_failing_mid_batch_keeps_its_bookkeeping(tiny, monkeypatch):
    """A ROME batch with bad input is refused before anything is written; a request failing after
    earlier ones were written leaves those recorded, so the next apply is accepted; restore()
    undoes all of it, the model's record of applied edits included."""
    import kvmem.editing.session as session_module

    model, stats = tiny
    before = _weights(model, (0, 1))
    depth = len(getattr(model, "_kvmem_edit_stack", []))
    paris = Fact("Paris is the capital of", "Paris", target_true="France", target_new="Spain")
    rivers = Fact("Rivers flow into the", "Rivers", target_true="sea", target_new="desert")
    s = EditSession(model, "rome", stats=stats, hparams=FAST, layers=[1])
    with pytest.raises(InvalidArgumentError, match="equals target_true"):
        s.apply([REQUEST, Fact("Rivers flow into the", "Rivers", target_true="sea", target_new="sea")])
    assert s.n_edits == 0 and all(torch.equal(mlp_weights(model, l).W_out, before[l]) for l in (0, 1))

    real, calls = session_module.compute_rome_edit, []

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise InvalidArgumentError("v* failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(session_module, "compute_rome_edit", fails_second)
    with pytest.raises(InvalidArgumentError, match="v\\* failed"):
        s.apply([REQUEST, paris])
    monkeypatch.undo()
    assert s.n_edits == 1 and len(s.edits) == 1
    s.apply([rivers])  # the session still knows the model it changed
    assert s.n_edits == 2
    s.restore()
    assert all(torch.equal(mlp_weights(model, l).W_out, before[l]) for l in (0, 1))
    assert len(model._kvmem_edit_stack) == depth


def test_counterfact_evaluation_of_a_memit_batch_scores_it_under_one_application(tiny, monkeypatch):
    """evaluate_counterfact scores the records of one MEMIT batch together, the edit applied once,
    with the same metrics as one record at a time (record_batch=1)."""
    import kvmem.evaluation as evaluation
    from kvmem.data import CounterFactRecord
    from kvmem.evaluation import batch_editor, evaluate_counterfact

    model, stats = tiny
    facts = [REQUEST, Fact("Paris is the capital of", "Paris", target_true="France", target_new="Spain"),
             Fact("The Colosseum is located in the city of", "The Colosseum", target_true="Rome", target_new="Paris")]
    records = [CounterFactRecord(case_id=i, request=f, template=f.prompt, paraphrase_prompts=(f"In short, {f.prompt}",),
                                 neighborhood_prompts=("The Louvre is located in the city of",), attribute_prompts=(),
                                 generation_prompts=())
               for i, f in enumerate(facts)]
    hp = MemitHparams(layers=(0, 1), value=FAST, mom2_update_weight=50.0)
    applied = []
    real_edited = evaluation.edited

    def counting(model, edit, **kw):
        applied.append(id(edit))
        return real_edited(model, edit, **kw)

    monkeypatch.setattr(evaluation, "edited", counting)
    frames = {}
    for n in (1, 3):
        applied.clear()
        editor = batch_editor(model, records, stats=stats, hparams=hp, batch_size=2)
        frames[n] = evaluate_counterfact(model, records, editor=editor, method="MEMIT", generation=False,
                                         record_batch=n, progress=False).to_frame()
        # batches {0, 1} and {2}: one application each when scored together, one per record otherwise
        assert len(applied) == (3 if n == 1 else 2)
    metrics = ["ES", "EM", "PS", "PM", "NS", "NM"]
    torch.testing.assert_close(torch.tensor(frames[3][metrics].to_numpy(dtype=float)),
                               torch.tensor(frames[1][metrics].to_numpy(dtype=float)), rtol=1e-5, atol=1e-6)
    assert list(frames[3]["condition"]) == ["unedited", "MEMIT"] * 3


def test_batch_editor_saves_each_batch_edit_and_reads_it_back(tiny, tmp_path, monkeypatch):
    """With save_dir, a batch's edit is written once and read back (not refitted) by a new editor with
    the same inputs; a duplicate the batch skipped is still refused after the read; other statistics
    give another file."""
    import kvmem.editing.memit as memit
    from kvmem.data import CounterFactRecord
    from kvmem.evaluation import batch_edit_path, batch_editor

    model, stats = tiny
    facts = [REQUEST, Fact("Paris is the capital of", "Paris", target_true="France", target_new="Spain"), REQUEST]
    records = [CounterFactRecord(case_id=i, request=f, template=f.prompt, paraphrase_prompts=(), neighborhood_prompts=(),
                                 attribute_prompts=(), generation_prompts=()) for i, f in enumerate(facts)]
    hp = MemitHparams(layers=(0, 1), value=FAST, mom2_update_weight=50.0)
    first = batch_editor(model, records, stats=stats, hparams=hp, batch_size=3, save_dir=tmp_path)(model, records[0])
    files = list(tmp_path.glob("batch_0000-*.safetensors"))
    assert len(files) == 1

    def refit(*a, **k):
        raise AssertionError("refitted a saved batch")

    monkeypatch.setattr(memit, "compute_memit_edit", refit)
    editor = batch_editor(model, records, stats=stats, hparams=hp, batch_size=3, save_dir=tmp_path)
    again = editor(model, records[1])
    assert [torch.equal(a, b) for (_, a), (_, b) in zip(first.deltas(), again.deltas())] == [True, True]
    with pytest.raises(InvalidArgumentError, match="skipped by its batch"):
        editor(model, records[2])  # the duplicate of records[0]
    other = {l: s.C * 2 for l, s in stats.items()} if hasattr(next(iter(stats.values())), "C") else {l: c * 2 for l, c in stats.items()}
    assert batch_edit_path(tmp_path, model, 0, [r.request for r in records], other, hp, ()) != \
        batch_edit_path(tmp_path, model, 0, [r.request for r in records], stats, hp, ())
