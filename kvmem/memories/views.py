"""Views of the memory analyses: circuitsvis token colouring and HTML token lists (all returned
as `kvmem.viz.HTMLView`, offline-safe), and static matplotlib figures (`plot(ax=None, *, title=None)`
convention of `kvmem.viz`).
"""

from __future__ import annotations

import html as _html
from typing import TYPE_CHECKING, Sequence

import torch

from kvmem.core.backend import run_to_layer
from kvmem.core.hooks import capture
from kvmem.core.weights import hook_post_name
from kvmem.memories._common import decode_tokens
from kvmem.viz import HTMLView, figure_axes

if TYPE_CHECKING:  # pragma: no cover
    from kvmem.memories.agreement import Agreement
    from kvmem.memories.composition import Composition
    from kvmem.memories.contexts import TopContexts
    from kvmem.memories.fact_view import FactMemories
    from kvmem.memories.values import ValueTokens


def _esc(s: str) -> str:
    return _html.escape(s).replace("\n", "\\n")


@torch.no_grad()
def key_contexts_html(model, top: "TopContexts", neuron: int, n: int = 10) -> HTMLView:
    """The neuron's coefficient on every token of its top-n contexts, as circuitsvis colored tokens.

    Each stored context is run again as the model saw it (start token first) and coloured by
    `hook_post[neuron]`; a context shorter than its window (`context=` in `top_contexts`) is re-run
    from its first stored token, so colours may differ slightly from the streamed coefficient,
    which is printed in the separator line. Only the trigger's own document is shown.
    """
    from circuitsvis.tokens import colored_tokens

    j = top.row(neuron)
    tokens: list[str] = []
    values: list[float] = []
    name = hook_post_name(model, top.layer)
    bos = model.tokenizer.bos_token_id if model.cfg.default_prepend_bos else None
    for s in range(min(n, top.k)):
        coef = float(top.coefficients[j, s])
        if coef == float("-inf"):
            break
        full = [int(i) for i in top.contexts[j, s].tolist() if int(i) >= 0]
        if bos is not None and (not full or full[0] != bos):
            full = [bos] + full
        shown = top.context_ids(neuron, s)
        store = {}
        with model.hooks(fwd_hooks=[(name, capture(store, "a"))]):
            run_to_layer(model, torch.tensor([full], device=model.W_U.device), top.layer + 1)
        acts = store["a"][0, -len(shown):, neuron].float().tolist() if shown else []
        nxt = decode_tokens(top.tokenizer, [int(top.next_tokens[j, s])])[0]
        tokens.append(f"\n#{s} coef={coef:.3g} next={nxt!r}\n")
        values.append(0.0)
        tokens += decode_tokens(top.tokenizer, shown)
        values += acts
    if not tokens:
        return HTMLView(f"<p>Layer {top.layer} neuron {neuron}: no contexts.</p>")
    heading = f"<h4>Key L{top.layer}.N{neuron}: top {min(n, top.k)} contexts</h4>"
    return HTMLView.from_circuitsvis(colored_tokens(tokens, values), heading)


def value_tokens_html(vt: "ValueTokens", neurons: Sequence[int] | None = None, n: int = 20) -> HTMLView:
    """A plain HTML table: each value's promoted and demoted tokens with their scores (`neurons`,
    or the result's first `n`)."""
    rows = list(range(len(vt.neurons)))[:n] if neurons is None else [vt.row(i) for i in neurons]
    out = [
        f"<table><caption>Layer {vt.layer} values (final_norm={vt.final_norm})</caption>",
        "<tr><th>neuron</th><th>promotes</th><th>demotes</th></tr>",
    ]
    for j in rows:
        top = decode_tokens(vt.tokenizer, vt.top_ids[j].tolist())
        bot = decode_tokens(vt.tokenizer, vt.bottom_ids[j].tolist())
        fmt = lambda toks, sc: " ".join(  # noqa: E731
            f"<code>{_esc(t)}</code><sub>{float(s):.2f}</sub>" for t, s in zip(toks, sc)
        )
        out.append(
            f"<tr><td>{int(vt.neurons[j])}</td><td>{fmt(top, vt.top_scores[j])}</td>"
            f"<td>{fmt(bot, vt.bottom_scores[j])}</td></tr>"
        )
    out.append("</table>")
    return HTMLView("\n".join(out))


def fact_memories_html(fm: "FactMemories", n: int = 10) -> HTMLView:
    """The strongest memories pushing a fact's answer, at each of the two positions."""
    from kvmem.memories.fact_view import POSITION_LABELS

    parts = [f"<h4>{_esc(fm.fact.prompt)} → {_esc(fm.target)}</h4>"]
    for p, label in enumerate(POSITION_LABELS):
        parts.append(f"<table><caption>{label}: {_esc(fm.str_tokens[fm.positions[p]])!s}</caption>")
        parts.append("<tr><th>layer</th><th>neuron</th><th>coef</th><th>push</th><th>value promotes</th></tr>")
        for layer, neuron, push in fm.top_memories(n, label):
            li = fm.layers.index(layer)
            j = int((fm.neurons[li, p] == neuron).nonzero()[0, 0])
            toks = decode_tokens(fm.tokenizer, fm.value_top_ids[li, p, j].tolist())
            parts.append(
                f"<tr><td>{layer}</td><td>{neuron}</td><td>{float(fm.coefficients[li, p, j]):.3g}</td>"
                f"<td>{push:.3g}</td><td>{' '.join('<code>' + _esc(t) + '</code>' for t in toks)}</td></tr>"
            )
        parts.append("</table>")
    return HTMLView("\n".join(parts))


def _axes(ax, n: int = 1):
    return figure_axes(ax, n, figsize=(5.5 * n, 3.6), constrained_layout=True)


def plot_agreement(ag: "Agreement", ax=None, *, title: str | None = None):
    """Agreement by layer against the shuffled and uniform baselines (log scale, percent)."""
    fig, (ax,) = _axes(ax)
    x = list(ag.layers)

    def pct(t):  # a zero cannot sit on a log axis: leave a gap (the table has the 0%)
        return [v * 100 if v > 0 else float("nan") for v in t.tolist()]

    ax.plot(x, pct(ag.agreement), "o-", label="value top-1 = next token of key's top trigger (gap: 0%)")
    ax.plot(x, pct(ag.in_value_topk), "s-", label=f"next token in value's top {ag.k_values}")
    ax.plot(x, pct(ag.shuffled), "o--", color="gray", label="shuffled values (top-1)")
    ax.plot(x, pct(ag.shuffled_in_topk), "s--", color="silver", label=f"shuffled (top {ag.k_values})")
    ax.axhline(ag.uniform * 100, color="k", lw=0.8, ls=":", label="uniform 1/|V|")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("% of memories")
    ax.set_title(title or f"Key-value agreement ({ag.n_tokens:,} tokens)")
    ax.legend(fontsize=7)
    return fig


def plot_composition(comp: "Composition", ax=None, *, title: str | None = None):
    """Left: refinement (residual's top token vs final; MLP keeps / overrides / composes).
    Right: active memories and compositional outputs. `ax`: two Axes."""
    fig, (a, b) = _axes(ax, 2)
    x = list(comp.layers)
    a.plot(x, comp.mid_matches_final.tolist(), "o-", label="residual before MLP = final top-1")
    a.plot(x, comp.post_matches_final.tolist(), "o-", label="residual after MLP = final top-1")
    a.plot(x, comp.kept.tolist(), "^--", label="MLP keeps residual's top-1")
    a.plot(x, comp.override.tolist(), "v--", label="changed to MLP output's top-1")
    a.plot(x, comp.compose.tolist(), "x--", label="changed to neither")
    a.set_ylim(-0.02, 1.02)
    a.set_xlabel("layer")
    a.set_ylabel("fraction of positions")
    a.set_title(f"Refinement ({comp.n_positions} positions)")
    a.legend(fontsize=7)
    b.plot(x, comp.compositional.tolist(), "o-", color="C3", label="MLP top-1 ≠ every active memory's top-1")
    b.set_ylim(-0.02, 1.02)
    b.set_xlabel("layer")
    b.set_ylabel("fraction of positions", color="C3")
    b2 = b.twinx()
    b2.plot(x, (comp.n_active / comp.d_mlp * 100).tolist(), "s--", color="C0", label=f"active ({comp.mass:.0%} of mass)")
    b2.plot(x, (comp.n_positive / comp.d_mlp * 100).tolist(), "^:", color="C2", label="coefficient > 0")
    b2.set_ylabel(f"% of {comp.d_mlp} memories")
    b.set_title("Composition")
    h1, l1 = b.get_legend_handles_labels()
    h2, l2 = b2.get_legend_handles_labels()
    b.legend(h1 + h2, l1 + l2, fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def plot_fact_memories(fm: "FactMemories", ax=None, *, title: str | None = None):
    """Each layer's MLP push toward the answer at the subject's last token and the last token."""
    from kvmem.memories.fact_view import POSITION_LABELS

    fig, (ax,) = _axes(ax)
    x = list(fm.layers)
    for p, label in enumerate(POSITION_LABELS):
        ax.plot(x, fm.total[:, p].tolist(), "o-", label=f"{label} ({fm.str_tokens[fm.positions[p]]!r}): all memories")
        ax.plot(x, fm.push[:, p, 0].tolist(), "x--", label=f"{label}: strongest single memory")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"push toward {fm.target!r} (logit)")
    ax.set_title(title or fm.fact.prompt, fontsize=9)
    ax.legend(fontsize=7)
    return fig
