"""Views of kvmem results: static matplotlib figures and offline-safe circuitsvis HTML.

Organised by analysis; each section takes result objects and returns a matplotlib `Figure`
or an `HTMLView`. Nothing here computes model outputs.

- Shared: `HTMLView` (circuitsvis output that never loads JavaScript from a CDN).
- Causal tracing: `plot_trace`, `plot_traces`, `show_traces`, `plot_average_effect`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

# --------------------------------------------------------------------------------------------
# Shared


class HTMLView:
    """Self-contained HTML (JavaScript inlined): renders in Jupyter offline, `str()` gives the page.

    circuitsvis's own `RenderedHTML` returns CDN-loading HTML from `str()` and probes the network
    in `_repr_html_`; this wrapper always uses its `local_src`.
    """

    def __init__(self, html: str):
        self.html = html

    def _repr_html_(self) -> str:
        return self.html

    def __html__(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(f"<!DOCTYPE html>\n<html><body>\n{self.html}\n</body></html>\n", encoding="utf-8")
        return path


def _local(rendered) -> HTMLView:
    return HTMLView(rendered.local_src)


def _figure(nrows: int = 1, ncols: int = 1, **kwargs):
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, **kwargs)


# --------------------------------------------------------------------------------------------
# Causal tracing

_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
_STATE = {"resid": "single restored layer", "mlp": "MLP", "attn": "Attn"}


def _token_labels(trace) -> list[str]:
    labels = []
    for pos, tok in enumerate(trace.str_tokens):
        tok = repr(tok)[1:-1] if tok.strip() != tok or not tok.isprintable() else tok
        star = "*" if trace.subject.start <= pos < trace.subject.end else ""
        labels.append(f"{tok}{star}")
    return labels


def plot_trace(trace, ax=None, title: str | None = None):
    """ROME-style heatmap of one `CausalTrace`: tokens down (subject tokens marked '*'),
    layers across, colour = answer probability from p_corrupt (white) upward."""
    if ax is None:
        fig, ax = _figure(figsize=(3.5 + 0.18 * trace.n_layers, 1.0 + 0.3 * len(trace.str_tokens)))
    else:
        fig = ax.figure
    scores = trace.scores.detach().float().T.numpy()  # [pos, layer]
    vmin = trace.p_corrupt
    import numpy as np

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


def plot_traces(traces: Sequence, title: str | None = None):
    """Side-by-side heatmaps (ROME fig. 1: residual, MLP, attention)."""
    traces = list(traces)
    first = traces[0]
    fig, axes = _figure(
        1, len(traces), figsize=(len(traces) * (3.5 + 0.18 * first.n_layers), 1.0 + 0.3 * len(first.str_tokens)),
        squeeze=False,
    )
    for ax, tr in zip(axes[0], traces):
        plot_trace(tr, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_traces(traces: Sequence) -> HTMLView:
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
    return _local(rendered)


def plot_average_effect(result, title: str | None = None):
    """AIE by layer: one panel per kind, one curve per ROME token bucket."""
    n = len(result.kinds)
    fig, axes = _figure(1, n, figsize=(4.2 * n, 3.2), squeeze=False, sharey=False)
    layers = list(range(result.aie.shape[-1]))
    for k, (ax, kind) in enumerate(zip(axes[0], result.kinds)):
        for b, bucket in enumerate(result.buckets):
            if int(result.counts[b]) == 0:
                continue
            bold = bucket in ("last subject token", "last token")
            ax.plot(layers, result.aie[k, b].numpy(), label=bucket, linewidth=2.2 if bold else 1.2)
        name = {"resid": "hidden states", "mlp": "MLP", "attn": "attention"}.get(kind, kind)
        ax.set_title(f"AIE of {name}" + (f" (window {result.window})" if kind != "resid" and result.window > 1 else ""),
                     fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)  # layers are whole numbers
        ax.axhline(0, color="grey", linewidth=0.5)
    axes[0][0].set_ylabel("average indirect effect")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title or f"{result.n_facts} facts ({result.n_skipped} skipped as wrong)", fontsize=10)
    fig.tight_layout()
    return fig
