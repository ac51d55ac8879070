"""The pre-screen (kvmem.tracing.screened): exact cells only where the estimate ranks a column's
layers highest. Checked against the exact trace of the same noise: each screened cell equals it,
and the chosen cells are the estimate's top layers of each requested column."""

from __future__ import annotations

import pytest
import torch

from kvmem import Fact
from kvmem.errors import InvalidArgumentError
from kvmem.tracing import attribution_trace, causal_trace
from kvmem.tracing.screened import screened_trace

pytestmark = pytest.mark.usefixtures("one_thread")

FACT = Fact("The Eiffel Tower is located in", "Eiffel Tower")
COMMON = dict(samples=3, seed=1, noise=0.5)


@pytest.mark.parametrize("kind,window,method", [("mlp", 2, "eap-ig"), ("attn", 1, "atp"), ("resid", 1, "atp")])
def test_screened_cells_are_the_exact_ones_at_the_estimates_top(tiny_model, kind, window, method):
    top = 2
    exact = causal_trace(tiny_model, FACT, kind=kind, window=window, progress=False, **COMMON)
    estimate = attribution_trace(tiny_model, FACT, kind=kind, window=window, method=method, **COMMON)
    screened = screened_trace(tiny_model, FACT, kind=kind, window=window, method=method, top=top, positions=None,
                              **COMMON)
    filled = ~torch.isnan(screened.scores)
    assert filled.sum(0).tolist() == [top] * screened.scores.shape[1]  # top cells in every column
    torch.testing.assert_close(screened.scores[filled], exact.scores[filled], rtol=1e-5, atol=1e-6)
    for pos in range(screened.scores.shape[1]):
        chosen = set(torch.nonzero(filled[:, pos]).flatten().tolist())
        ranked = torch.argsort(estimate.scores[:, pos].double(), descending=True, stable=True)[:top].tolist()
        assert chosen == set(ranked)
    assert screened.p_corrupt == pytest.approx(exact.p_corrupt, rel=1e-6)
    assert screened.method.endswith(f"-> exact top {top}")


def test_default_column_is_the_last_subject_token(tiny_model):
    tr = screened_trace(tiny_model, FACT, window=2, **COMMON)
    filled = ~torch.isnan(tr.scores)
    assert torch.nonzero(filled.any(0)).flatten().tolist() == [tr.subject.last]


def test_bad_top(tiny_model):
    with pytest.raises(InvalidArgumentError, match="top must be"):
        screened_trace(tiny_model, FACT, top=0, **COMMON)
    with pytest.raises(InvalidArgumentError, match="top must be"):
        screened_trace(tiny_model, FACT, top=tiny_model.cfg.n_layers + 1, **COMMON)
