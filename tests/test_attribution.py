"""Attribution tracing (kvmem.tracing.attribution) against the exact causal trace of the same noise.

Independent checks: the exact trace (itself checked against ROME's naive loop in test_tracing);
the first-order limit (attribution patching's error shrinks in proportion to the patch);
completeness of integrated gradients (the path integral of the gradient equals the metric
difference, so "ig" converges to the exact cell); GradDrop's identity at the last layer.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from kvmem import Fact
from kvmem.errors import InvalidArgumentError
from kvmem.tracing import CausalTrace, attribution_trace, attribution_trace_all, average_indirect_effect, causal_trace

pytestmark = pytest.mark.usefixtures("one_thread")

FACT = Fact("The Eiffel Tower is located in", "Eiffel Tower")
COMMON = dict(samples=3, seed=1)


def rel_err(estimate: CausalTrace, exact: CausalTrace) -> float:
    ie = exact.indirect_effect
    return float((estimate.indirect_effect - ie).abs().max() / ie.abs().max())


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_atp_is_the_first_order_of_a_small_patch(tiny_model, kind):
    # the error of a linearisation is second order: shrinking the patch 10x shrinks the relative
    # error ~10x, and a small patch is estimated within a few percent
    errs = []
    for noise in (1e-2, 1e-3):
        exact = causal_trace(tiny_model, FACT, kind=kind, window=1, noise=noise, progress=False, **COMMON)
        atp = attribution_trace(tiny_model, FACT, kind=kind, window=1, noise=noise, method="atp", **COMMON)
        errs.append(rel_err(atp, exact))
    assert errs[1] < 0.05
    assert errs[1] < errs[0] / 4


@pytest.mark.parametrize("kind,window", [("resid", 1), ("mlp", 2), ("attn", 1)])
def test_ig_converges_to_the_exact_cell(tiny_model, kind, window):
    # completeness along each cell's own path: m(patched) - m(corrupt) = ∫ Δ·∇m, so the estimate of
    # a large patch (noise 0.5) converges to the exact trace as the steps grow
    exact = causal_trace(tiny_model, FACT, kind=kind, window=window, noise=0.5, progress=False, **COMMON)
    coarse = attribution_trace(tiny_model, FACT, kind=kind, window=window, noise=0.5, method="ig", steps=1, **COMMON)
    fine = attribution_trace(tiny_model, FACT, kind=kind, window=window, noise=0.5, method="ig", steps=16, **COMMON)
    assert rel_err(fine, exact) < 5e-3
    assert rel_err(fine, exact) < rel_err(coarse, exact) / 20
    assert fine.method == "ig(k=16)" and exact.method == "exact"


def test_atp_windows_sum_the_layers_of_the_exact_traces_window(tiny_gpt2):
    # on the linear scale a window's AtP estimate is the sum of its layers' single-layer estimates,
    # over exactly the layers the exact trace restores (`window_layers`, clipped at both ends)
    from kvmem.tracing.trace import window_layers

    n = tiny_gpt2.cfg.n_layers
    kw = dict(kind="mlp", noise=0.5, method="atp", scale="prob", **COMMON)
    one = attribution_trace(tiny_gpt2, FACT, window=1, **kw).indirect_effect.double()
    for w in (2, 3):
        est = attribution_trace(tiny_gpt2, FACT, window=w, **kw).indirect_effect.double()
        expected = torch.stack([one[list(window_layers(l, w, n))].sum(0) for l in range(n)])
        torch.testing.assert_close(est, expected, rtol=1e-4, atol=1e-6)


def test_corrupted_prompt(tiny_gpt2):
    corrupted = "The Colosseum is located in"
    exact = causal_trace(tiny_gpt2, FACT, kind="attn", window=1, corrupted=corrupted, progress=False)
    ig = attribution_trace(tiny_gpt2, FACT, kind="attn", window=1, corrupted=corrupted, method="ig", steps=16)
    assert exact.samples == ig.samples == 1 and ig.p_corrupt == pytest.approx(exact.p_corrupt, rel=1e-6)
    assert rel_err(ig, exact) < 1e-2
    atp = attribution_trace(tiny_gpt2, FACT, kind="attn", window=1, corrupted=corrupted, method="atp")
    assert torch.isfinite(atp.scores).all()
    with pytest.raises(InvalidArgumentError, match="same token length"):
        attribution_trace(tiny_gpt2, FACT, corrupted="The big old Colosseum is located in")


def test_graddrop_leaves_the_last_layers_mlp_unchanged(tiny_gated):
    # nothing lies above the last layer's MLP output, so no dropped layer changes its gradient:
    # AtP* equals AtP there, and differs below
    atp = attribution_trace(tiny_gated, FACT, kind="mlp", window=1, noise=0.5, method="atp", **COMMON)
    star = attribution_trace(tiny_gated, FACT, kind="mlp", window=1, noise=0.5, method="atp*", **COMMON)
    torch.testing.assert_close(star.scores[-1], atp.scores[-1], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(star.scores[0], atp.scores[0])


def test_same_result_type_noise_and_views_as_causal_trace(tiny_gpt2):
    exact = causal_trace(tiny_gpt2, FACT, kind="mlp", window=2, noise=0.5, progress=False, **COMMON)
    est = attribution_trace(tiny_gpt2, FACT, kind="mlp", window=2, noise=0.5, method="eap-ig", steps=2, **COMMON)
    assert type(est) is type(exact) and est.scores.shape == exact.scores.shape
    for name in ("kind", "p_clean", "str_tokens", "subject", "answer", "answer_id", "window", "noise", "samples", "seed"):
        assert getattr(est, name) == getattr(exact, name), name
    assert est.p_corrupt == pytest.approx(exact.p_corrupt, rel=1e-6)  # the same noise samples
    assert list(est.to_frame().columns) == list(exact.to_frame().columns)
    est.plot()
    assert "<" in est.show()._repr_html_()
    both = attribution_trace_all(tiny_gpt2, FACT, window=2, noise=0.5, method="atp", **COMMON)
    for kind in both.kinds:
        single = attribution_trace(tiny_gpt2, FACT, kind=kind, window=2, noise=0.5, method="atp", **COMMON)
        torch.testing.assert_close(both[kind].scores, single.scores)
    assert both["resid"].window == 1


def test_positions_and_seed(tiny_gpt2):
    full = attribution_trace(tiny_gpt2, FACT, kind="attn", noise=0.5, method="atp", **COMMON)
    last = attribution_trace(tiny_gpt2, FACT, kind="attn", noise=0.5, method="atp", positions="subject_last", **COMMON)
    col = full.subject.last
    torch.testing.assert_close(last.scores[:, col], full.scores[:, col])
    assert torch.isnan(last.scores[:, :col]).all() and torch.isnan(last.scores[:, col + 1:]).all()
    again = attribution_trace(tiny_gpt2, FACT, kind="attn", noise=0.5, method="atp", **COMMON)
    assert torch.equal(again.scores, full.scores)
    other = attribution_trace(tiny_gpt2, FACT, kind="attn", noise=0.5, method="atp", samples=3, seed=2)
    assert not torch.allclose(other.scores, full.scores)


def _state(model):
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest(), [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("method", ["atp", "atp*", "ig", "eap-ig"])
def test_model_unchanged_and_no_gradients_left(tiny_gated, method):
    before = _state(tiny_gated)
    with torch.no_grad():  # the caller's grad mode does not matter, and is restored
        attribution_trace(tiny_gated, FACT, kind="mlp", window=2, noise=0.5, method=method, steps=None, **COMMON)
        assert not torch.is_grad_enabled()
    assert _state(tiny_gated) == before
    assert all(p.grad is None for p in tiny_gated.parameters())
    assert not [n for n, hp in tiny_gated.hook_dict.items() if hp._forward_hooks or hp._backward_hooks]


@pytest.mark.parametrize("method", ["atp*", "ig"])
def test_an_error_mid_pass_leaves_no_hook_and_the_grad_mode(tiny_gated, monkeypatch, method):
    # a forward that raises halfway (out of memory, a user's hook) must not leave kvmem's hooks on
    # the user's model, nor gradients switched on
    from kvmem.tracing import attribution

    real = attribution.forward_rows

    def boom(activation, hook=None):
        raise RuntimeError("boom")

    def failing(model, run, groups, start_pos, fwd_hooks=()):
        return real(model, run, groups, start_pos, list(fwd_hooks) + [("blocks.1.hook_resid_pre", boom)])

    def module_hooks():  # every module's hooks, the bridge's cache hand-over pre-hooks included
        return {n: (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks))
                for n, m in tiny_gated.named_modules()}

    kw = dict(kind="mlp", window=2, noise=0.5, method=method, steps=None, **COMMON)
    attribution_trace(tiny_gated, FACT, **kw)  # a bridge wires its own capture hooks on a first forward
    before = module_hooks()
    monkeypatch.setattr(attribution, "forward_rows", failing)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            attribution_trace(tiny_gated, FACT, **kw)
        assert not torch.is_grad_enabled()
    assert module_hooks() == before
    assert not [n for n, hp in tiny_gated.hook_dict.items() if hp._forward_hooks or hp._backward_hooks]
    assert all(p.grad is None for p in tiny_gated.parameters())


def test_average_indirect_effect_by_attribution(factworld, world, tmp_path):
    facts = [Fact(f.prompt, f.subject, target_true=f.target, relation_id=f.relation)
             for f in world.facts("train")[:2]]
    log = tmp_path / "aie.jsonl"
    kw = dict(kinds=("mlp", "attn"), window=1, samples=2, progress=False)
    est = average_indirect_effect(factworld, facts, method="ig", steps=16, log=str(log), **kw)
    exact = average_indirect_effect(factworld, facts, **kw)
    assert est.n_facts == exact.n_facts == 2
    ok = ~torch.isnan(exact.aie)
    # 16 steps on the full noise: within 5% of the largest effect (convergence itself: test_ig_converges...)
    torch.testing.assert_close(est.aie[ok], exact.aie[ok], rtol=0, atol=5e-2 * float(exact.aie[ok].abs().max()))
    again = average_indirect_effect(factworld, facts, method="ig", steps=16, log=str(log), **kw)  # resumed
    assert torch.equal(again.aie[ok], est.aie[ok])
    with pytest.raises(Exception, match="other settings"):  # a log of another method is not mixed in
        average_indirect_effect(factworld, facts, method="atp", log=str(log), **kw)
    # the result says it is an estimate; steps without a method is refused, not ignored
    assert est.method == "ig(k=16)" and exact.method == "exact"
    with pytest.raises(InvalidArgumentError, match="steps=16 is the path of an attribution method"):
        average_indirect_effect(factworld, facts, steps=16, **kw)


def test_bad_input(tiny_gpt2):
    with pytest.raises(InvalidArgumentError, match="Unknown attribution method"):
        attribution_trace(tiny_gpt2, FACT, method="gradient")
    with pytest.raises(InvalidArgumentError, match="steps=1"):
        attribution_trace(tiny_gpt2, FACT, method="atp", steps=4)
    with pytest.raises(InvalidArgumentError, match="steps must be"):
        attribution_trace(tiny_gpt2, FACT, method="ig", steps=0)
    with pytest.raises(InvalidArgumentError, match="kind"):
        attribution_trace(tiny_gpt2, FACT, kind="heads")


def test_cli_trace_method(factworld, tmp_path, capsys):
    import json

    from kvmem.cli import main

    code = main(["trace", "--out", str(tmp_path), "--samples", "2", "--kinds", "mlp,attn", "--method", "atp", "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "atp" and summary["mlp_peak"]["layer"] in range(4)
    assert (tmp_path / "trace.png").stat().st_size > 0
    assert main(["trace", "--out", str(tmp_path / "x"), "--steps", "4", "--quiet"]) != 0  # --steps needs ig/eap-ig
    assert "--steps goes with --method" in capsys.readouterr().err
    # the Ray flags are refused without --facts, not silently ignored
    assert main(["trace", "--out", str(tmp_path / "y"), "--workers", "2", "--quiet"]) != 0
    assert "go with --facts FILE" in capsys.readouterr().err


def test_diagnose_prescreen_uses_the_attribution_column(factworld, world):
    from kvmem.pipelines.diagnose import diagnose
    from kvmem.tracing import noise_level

    f = world.facts("train")[0]
    fact = Fact(f.prompt, f.subject, target_true=f.target, relation_id=f.relation)
    loc = diagnose(factworld, fact, samples=3, steps=4, trace_method="atp")
    noise = noise_level(factworld, [fact])
    est = attribution_trace(factworld, fact, kind="mlp", window=1, noise=noise, samples=3, method="atp")
    torch.testing.assert_close(loc.trace_single[0], est.indirect_effect[:, est.subject.last].double())
    assert loc.trace_method == "atp" and loc.summary()["trace_method"] == "atp"
    with pytest.raises(InvalidArgumentError, match="Unknown attribution method.*use 'exact'"):
        diagnose(factworld, fact, samples=3, steps=4, trace_method="fast")
