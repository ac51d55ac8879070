"""The demo as a library pipeline: `four_views` runs each analysis exactly as called alone, the
edit lands on factworld (ground truth), the FactReport's summaries read its results, and the
offline report renders it."""

from __future__ import annotations

import pytest
import torch

from kvmem.errors import InvalidArgumentError
from kvmem.factworld import counterfact_records
from kvmem.pipelines.four_views import FactReport, four_views, peak_remark, trace_peak

FAST = dict(samples=2, steps=4, n_tokens=4000)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def record():
    return counterfact_records(n=1)[0]


@pytest.fixture(scope="module")
def views(factworld, record, tmp_path_factory) -> FactReport:
    return four_views(factworld, record.request, paraphrases=record.paraphrase_prompts,
                      neighbours=record.neighborhood_prompts, cache_dir=tmp_path_factory.mktemp("cache"),
                      progress=False, **FAST)


def test_each_view_is_the_analysis_run_alone(factworld, record, views):
    from kvmem import config
    from kvmem.memories import fact_memories
    from kvmem.neurons import knowledge_neurons
    from kvmem.tracing import trace_all

    fact = record.request
    traces = trace_all(factworld, fact, samples=2, progress=False)
    for got, alone in zip(views.traces, traces):
        torch.testing.assert_close(got.scores, alone.scores, rtol=0, atol=0)
    assert views.traces["mlp"].window == config.trace_window(factworld.cfg.n_layers)
    kn = knowledge_neurons(factworld, [fact.prompt, *record.paraphrase_prompts], fact.target_true, steps=4,
                           progress=False)
    assert views.neurons.neurons == kn.neurons and views.neurons.prompts == kn.prompts
    assert [e.factor for e in views.effects] == ([0.0, 2.0] if kn.neurons else [])
    torch.testing.assert_close(views.memories.total, fact_memories(factworld, fact).total)
    assert views.edit.layer == 0 and views.stats_tokens == 4000  # factworld's preset; n_tokens as given
    assert set(views.timings) == {"ROME statistics", "causal tracing", "knowledge neurons", "memories",
                                  "ROME edit + evaluation"}


def test_the_edit_lands_and_keeps_the_neighbours(record, views):
    """factworld is the ground truth: the rewrite and its paraphrases take the new object,
    neighbours keep the old one (benchmarks/results: ES = PS = 100 at layer 0)."""
    s = views.summary()
    assert s["counterfact"]["ES"] == 100.0 and s["counterfact"]["PS"] == 100.0
    answers = views.to_frame()
    assert list(answers.columns) == ["prompt", "kind", "before", "after"]
    assert list(answers["kind"]) == ["rewrite"] + ["paraphrase"] * 3 + ["neighbour"] * 3
    rewrite = answers.iloc[0]
    assert rewrite["before"] == record.request.target_true and rewrite["after"] == record.request.target_new
    neighbours = answers[answers["kind"] == "neighbour"]
    assert (neighbours["before"] == record.request.target_true).all()


def test_summary_and_lines_read_the_results(views):
    s = views.summary()
    layer, pos, ie = trace_peak(views.traces["mlp"])
    mlp = views.traces["mlp"]
    assert s["mlp_peak"] == {"layer": layer, "token": mlp.str_tokens[pos], "indirect_effect": ie,
                             "at_last_subject_token": pos == mlp.subject.last, "remark": peak_remark(mlp)}
    assert s["edit_layer"] == views.edit.layer and s["knowledge_neurons"] == [list(n) for n in views.neurons.neurons]
    assert s["p_clean"] == views.traces.p_clean > s["p_corrupt"]
    lines = views.lines()
    assert len(lines) == 4 and lines[3].startswith(f"4. ROME at layer {views.edit.layer}")
    assert f"peaks at layer {layer}" in lines[0]


def test_plot_and_report(views):
    import matplotlib.pyplot as plt

    from kvmem.viz.report import fact_report

    fig = views.plot(title="four views")
    assert fig._suptitle.get_text() == "four views" and len(fig.axes) >= 4
    plt.close(fig)
    page = fact_report(views, meta={"model": "factworld"})
    html = page.render()
    for heading in ("1. Causal tracing", "2. Knowledge neurons", "3. Key-value memories", "4. ROME"):
        assert heading in html
    assert page.n_figures >= 4 and "CircuitsVis.render(" in html and "unpkg.com" not in html
    assert "4000 tokens" in html and "<td>model</td>" in html


def test_bad_input(factworld, tiny_gpt2, record):
    from kvmem.core.facts import Fact

    fact = record.request
    with pytest.raises(InvalidArgumentError, match="target_new"):
        four_views(factworld, Fact(fact.prompt, fact.subject, target_true=fact.target_true), **FAST)
    big_ben = Fact("Big Ben is in the city of", "Big Ben", target_true=" London", target_new=" Paris")
    with pytest.raises(InvalidArgumentError, match="window"):  # checked first, before any statistics
        four_views(tiny_gpt2, big_ben, window=99, **FAST)
    with pytest.raises((InvalidArgumentError, TypeError), match="Fact"):  # beartype may see it first
        four_views(factworld, fact.prompt, **FAST)


def test_rome_settings(factworld, tiny_gpt2):
    """The pipelines' ROME settings: the preset (fewer context prefixes on factworld), else ~30%
    depth without facts to trace; `layer` overrides; statistics sized to keep C invertible."""
    from kvmem.editing import rome_hparams
    from kvmem.errors import LayerOutOfRangeError
    from kvmem.pipelines.rome_settings import FAST_PREFIXES, rome_settings, stats_tokens

    hp = rome_settings(factworld)
    assert hp.layer == rome_hparams(factworld).layer == 0 and hp.prefixes == FAST_PREFIXES
    assert rome_settings(factworld, layer=2).layer == 2
    tiny = rome_settings(tiny_gpt2)
    assert tiny.layer == round(0.3 * (tiny_gpt2.cfg.n_layers - 1)) and tiny.prefixes == FAST_PREFIXES
    with pytest.raises((LayerOutOfRangeError, InvalidArgumentError)):
        rome_settings(factworld, layer=factworld.cfg.n_layers)
    assert stats_tokens(tiny_gpt2) == 20_000 and stats_tokens(factworld) == max(20_000, 40 * factworld.cfg.d_mlp)


def test_a_peak_away_from_the_last_subject_token_is_remarked(views):
    """ROME's MLP site is the last subject token; a trace peaking elsewhere says where, in words."""
    import dataclasses

    import torch

    mlp = views.traces["mlp"]
    span, n_layers, n_pos = mlp.subject, *mlp.indirect_effect.shape

    def peaking_at(pos: int, layer: int = 1):
        ie = torch.zeros(n_layers, n_pos)
        ie[layer, pos] = 0.5
        ie[0, span.last] = 0.2
        return dataclasses.replace(mlp, scores=ie + mlp.p_corrupt)  # indirect effect = scores - p_corrupt

    assert peak_remark(peaking_at(span.last)) is None
    last = mlp.str_tokens[span.last]
    if len(span) > 1:
        r = peak_remark(peaking_at(span.start))
        assert r.startswith(f"the MLP restoration peaks at an earlier subject token, {mlp.str_tokens[span.start]!r}")
        assert f"not at the last subject token {last!r}, where ROME" in r and "+0.20 at layer 0" in r
    r = peak_remark(peaking_at(n_pos - 1))
    assert r.startswith("the MLP restoration peaks at the last prompt token, layer 1 (+0.50)")
