"""Figures and views of causal traces: ROME's heatmaps (fig. 1), the average-effect curves
(fig. 2) and an interactive circuitsvis view. Nothing here computes model outputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from kvmem.viz import HTMLView, figure_axes

if TYPE_CHECKING:  # pragma: no cover
    from kvmem.tracing.results import AverageEffect, CausalTrace

_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
_STATE = {"resid": "single restored layer", "mlp": "MLP", "attn": "Attn"}


def _token_labels(trace: "CausalTrace") -> list[str]:
    labels = []
    for pos, tok in enumerate(trace.str_tokens):
        tok = repr(tok)[1:-1] if tok.strip() != tok or not tok.isprintable() else tok
        star = "*" if trace.subject.start <= pos < trace.subject.end else ""
        labels.append(f"{tok}{star}")
    return labels


def _heatmap_size(trace: "CausalTrace", n: int = 1) -> tuple[float, float]:
    return n * (3.5 + 0.18 * trace.n_layers), 1.0 + 0.3 * len(trace.str_tokens)


def plot_trace(trace: "CausalTrace", ax=None, *, title: str | None = None):
    """ROME-style heatmap of one `CausalTrace`: tokens down (subject tokens marked '*'),
    layers across, colour = answer probability from p_corrupt (white) upward."""
    import numpy as np

    fig, (ax,) = figure_axes(ax, 1, figsize=_heatmap_size(trace))
    scores = trace.scores.detach().float().T.numpy()  # [pos, layer]
    vmin = trace.p_corrupt
    traced = scores[~np.isnan(scores)]  # a trace of chosen positions (positions=...) is NaN elsewhere
    vmax = max(float(traced.max()) if traced.size else vmin, vmin + 1e-6)
    img = ax.pcolor(scores, cmap=_CMAPS.get(trace.kind, "Purples"), vmin=vmin, vmax=vmax)
    ax.invert_yaxis()
    ax.set_yticks([0.5 + i for i in range(len(trace.str_tokens))])
    ax.set_yticklabels(_token_labels(trace))
    step = max(1, trace.n_layers // 10)
    ax.set_xticks([0.5 + i for i in range(0, trace.n_layers, step)])
    ax.set_xticklabels(list(range(0, trace.n_layers, step)))
    if trace.sever:
        default_title = f"Restoring the residual with {trace.sever.upper()} severed"
    elif trace.kind == "resid":
        default_title = "Impact of restoring state after corrupted input"
    else:
        default_title = f"Impact of restoring {_STATE[trace.kind]} after corrupted input"
    ax.set_title(title or default_title, fontsize=9)
    if trace.kind == "resid" or trace.window == 1:
        ax.set_xlabel("single restored layer")
    else:
        ax.set_xlabel(f"center of interval of {trace.window} restored {_STATE[trace.kind]} layers")
    cb = fig.colorbar(img, ax=ax)
    cb.ax.set_title(f"p({trace.answer.strip()})", y=-0.12, fontsize=8)
    return fig


def plot_traces(traces: Sequence["CausalTrace"], ax=None, *, title: str | None = None):
    """Side-by-side heatmaps (ROME fig. 1: residual, MLP, attention); `ax`: one Axes per trace."""
    traces = list(traces)
    new = ax is None
    fig, axes = figure_axes(ax, len(traces), figsize=_heatmap_size(traces[0], len(traces)))
    for a, tr in zip(axes, traces):
        plot_trace(tr, a)
    if title:
        fig.suptitle(title)
    if new:  # lay out only a figure made here, never the caller's
        fig.tight_layout()
    return fig


def show_traces(traces: Sequence["CausalTrace"]) -> HTMLView:
    """Interactive view: pick a kind and a layer, tokens coloured by indirect effect (offline-safe)."""
    import torch
    from circuitsvis.activations import text_neuron_activations

    traces = list(traces)
    ie = torch.stack([t.indirect_effect for t in traces])  # [kind, layer, pos]
    activations = ie.permute(2, 0, 1).contiguous().float()  # [pos, kind, layer]
    labels = [t.kind + (f" (sever {t.sever})" if t.sever else "") for t in traces]
    tokens = [tok + ("*" if traces[0].subject.start <= i < traces[0].subject.end else "")
              for i, tok in enumerate(traces[0].str_tokens)]
    rendered = text_neuron_activations(
        tokens=tokens,
        activations=activations,
        first_dimension_name="Kind",
        second_dimension_name="Layer",
        first_dimension_labels=labels,
        second_dimension_labels=[str(i) for i in range(ie.shape[1])],
    )
    return HTMLView.from_circuitsvis(rendered)


def plot_average_effect(result: "AverageEffect", ax=None, *, title: str | None = None):
    """AIE by layer: one panel per kind (`ax`: one Axes per kind), one curve per ROME token bucket."""
    n = len(result.kinds)
    new = ax is None
    fig, axes = figure_axes(ax, n, figsize=(4.2 * n, 3.2))
    layers = list(range(result.aie.shape[-1]))
    for k, (a, kind) in enumerate(zip(axes, result.kinds)):
        for b, bucket in enumerate(result.buckets):
            if int(result.counts[b]) == 0:
                continue
            bold = bucket in ("last subject token", "last token")
            a.plot(layers, result.aie[k, b].numpy(), label=bucket, linewidth=2.2 if bold else 1.2)
        name = {"resid": "hidden states", "mlp": "MLP", "attn": "attention"}.get(kind, kind)
        window = f" (window {result.window})" if kind != "resid" and result.window > 1 else ""
        a.set_title(f"AIE of {name}{window}", fontsize=9)
        a.set_xlabel("layer")
        a.xaxis.get_major_locator().set_params(integer=True)  # layers are whole numbers
        a.axhline(0, color="grey", linewidth=0.5)
    axes[0].set_ylabel("average indirect effect")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title or f"{result.n_facts} facts ({result.n_skipped} skipped as wrong)", fontsize=10)
    if new:
        fig.tight_layout()
    return fig


__all__ = ["plot_trace", "plot_traces", "show_traces", "plot_average_effect"]
