"""One self-contained HTML report per fact: opens from disk, loads nothing from the network.

    rep = Report("kvmem: one fact, four views")
    rep.section("Causal tracing", "MLPs at the last subject token carry the answer.")
    rep.figure(traces.plot(), "restoring one state at a time")
    rep.view(traces.show(), "indirect effect per token")    # circuitsvis, JavaScript inline
    rep.save("report.html")

Figures are embedded as base64 PNG images. circuitsvis components keep their JavaScript
inline (`local_src`); the ~1.3 MB bundle each component carries is written once and shared, so
a report with many components stays small. A Content-Security-Policy forbids every fetch, so
even a component that tried to load something from the network could not.

`fact_report` lays out a `FactReport`, the four analyses of one fact (what `kvmem demo` writes).
"""

from __future__ import annotations

import base64
import html as _html
import io
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from kvmem.errors import InvalidArgumentError
from kvmem.viz.html import HTMLView

# Everything the page needs is inline; nothing may be fetched (images are data: URLs). The
# circuitsvis bundle carries TensorFlow.js, which probes WebAssembly: allowed, it is no fetch.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline' 'wasm-unsafe-eval'; style-src 'unsafe-inline'; "
    "img-src data:; font-src data:; connect-src 'none'"
)

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: .9em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f4f4f4; } caption { text-align: left; font-weight: 600; padding: .3em 0; }
code { background: #f4f4f4; padding: 0 .2em; } .meta { color: #666; font-size: .85em; }
.kvmem-view { margin: 1em 0; }
"""

_SCRIPT_OPEN = '<script crossorigin type="module">'
_RENDER = "CircuitsVis.render("
_SELF_CLOSING_DIV = re.compile(r'<div id="(circuits-vis-[^"]+)"([^>]*?)\s*/>')
_SOURCE_MAP = re.compile(r"^//# sourceMappingURL=.*$", re.MULTILINE)


def esc(text: Any) -> str:
    return _html.escape(str(text))


def figure_png(fig, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _source(view: Any) -> str:
    """The offline HTML of a kvmem view (`HTMLView`, what every `.show()` returns), a circuitsvis
    RenderedHTML (its inlined source), an HTML string, or anything else with `_repr_html_`."""
    if isinstance(view, str):
        return view
    if isinstance(view, HTMLView):
        return view.html
    local = getattr(view, "local_src", None)  # circuitsvis RenderedHTML: never its CDN str()
    if isinstance(local, str):
        return local
    if hasattr(view, "_repr_html_"):
        return view._repr_html_()
    raise InvalidArgumentError(
        f"Cannot embed a {type(view).__name__}: pass a kvmem view (.show()), a circuitsvis result or an HTML string."
    )


def split_bundle(src: str) -> tuple[str | None, str]:
    """(the circuitsvis JavaScript bundle, the HTML without it) of one view's offline source.

    circuitsvis's `local_src` is `<div id=...>` + a module script holding the whole bundle followed
    by a `CircuitsVis.render(...)` call. The bundle is cut out so the report can carry it once;
    a source of another shape comes back unchanged with bundle None (embedded as it is).
    """
    bundle = None
    out = []
    rest = src
    while True:
        i = rest.find(_SCRIPT_OPEN)
        j = rest.find(_RENDER, i + 1) if i >= 0 else -1
        if i < 0 or j < 0:
            out.append(rest)
            break
        this = rest[i + len(_SCRIPT_OPEN) : j]
        if bundle is not None and this != bundle:  # two circuitsvis versions: leave this one whole
            out.append(rest[: j])
        else:
            bundle = this
            out.append(rest[:i] + '<script type="module">\n')
        rest = rest[j:]
        k = rest.find("</script>")
        if k < 0:
            out.append(rest)
            break
        out.append(rest[: k + len("</script>")])
        rest = rest[k + len("</script>") :]
    html = _SELF_CLOSING_DIV.sub(r'<div id="\1"\2></div>', "".join(out))
    return bundle, html


class Report:
    """An HTML page built section by section; `render()` gives the self-contained document."""

    def __init__(self, title: str, subtitle: str | None = None):
        self.title = title
        self.subtitle = subtitle
        self._parts: list[str] = []
        self._bundle: str | None = None
        self.n_figures = 0
        self.n_views = 0

    # -- content --
    def section(self, title: str, text: str | None = None) -> "Report":
        self._parts.append(f"<h2>{esc(title)}</h2>")
        if text:
            self.text(text)
        return self

    def text(self, text: str) -> "Report":
        """A paragraph of plain text (escaped)."""
        self._parts.append(f"<p>{esc(text)}</p>")
        return self

    def html(self, raw: str) -> "Report":
        """Raw HTML written by kvmem (tables of results); never user-supplied markup."""
        self._parts.append(raw)
        return self

    def figure(self, fig, caption: str = "") -> "Report":
        """A matplotlib figure (or PNG bytes) as an inline base64 image."""
        png = fig if isinstance(fig, (bytes, bytearray)) else figure_png(fig)
        data = base64.b64encode(bytes(png)).decode("ascii")
        self.n_figures += 1
        cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
        self._parts.append(
            f'<figure class="kvmem-figure"><img alt="{esc(caption or "figure")}" '
            f'src="data:image/png;base64,{data}">{cap}</figure>'
        )
        return self

    def view(self, view: Any, caption: str = "") -> "Report":
        """An interactive view (`.show()` of a kvmem result, or any circuitsvis result)."""
        bundle, body = split_bundle(_source(view))
        if bundle is not None:
            if self._bundle is None:
                self._bundle = bundle
            elif bundle != self._bundle:  # another circuitsvis build: keep its own copy inline
                body = _source(view)
        self.n_views += 1
        cap = f"<p class=\"meta\">{esc(caption)}</p>" if caption else ""
        self._parts.append(f'<div class="kvmem-view">{cap}{body}</div>')
        return self

    def table(self, rows: Sequence[dict] | Any, caption: str = "", floatfmt: str = ".3g") -> "Report":
        """A table from a list of dicts or a pandas DataFrame."""
        if hasattr(rows, "to_dict"):
            rows = rows.to_dict(orient="records")
        rows = list(rows)
        if not rows:
            return self
        cols = list(dict.fromkeys(c for r in rows for c in r))
        out = ["<table>"]
        if caption:
            out.append(f"<caption>{esc(caption)}</caption>")
        out.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
        for r in rows:
            out.append("<tr>" + "".join(f"<td>{esc(_fmt(r.get(c, ''), floatfmt))}</td>" for c in cols) + "</tr>")
        out.append("</table>")
        self._parts.append("\n".join(out))
        return self

    # -- output --
    def render(self) -> str:
        head = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(self.title)}</title>",
            f"<style>{_STYLE}</style>",
        ]
        if self._bundle is not None:
            # A module script (as circuitsvis ships it) that also exposes the bundle to the
            # components' own module scripts, which run after it in document order.
            bundle = _SOURCE_MAP.sub("", self._bundle)  # a source map would be a fetch
            head.append(f'<script type="module">\n{bundle}\nwindow.CircuitsVis = CircuitsVis;\n</script>')
        head.append("</head><body>")
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        body = [f"<h1>{esc(self.title)}</h1>"]
        if self.subtitle:
            body.append(f"<p>{esc(self.subtitle)}</p>")
        body.append(f'<p class="meta">written by kvmem on {stamp}; works offline</p>')
        return "\n".join(head + body + self._parts + ["</body></html>", ""])

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temporary file, then a rename): never half a report on disk."""
        from kvmem.runs import write_atomic

        path = Path(path)
        write_atomic(path, self.render())
        return path


def _fmt(value: Any, floatfmt: str) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else format(value, floatfmt)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, floatfmt) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------------
# One fact, four views


def fact_report(report, *, title: str | None = None, meta: dict | None = None) -> Report:
    """The page `kvmem demo` writes for a `FactReport` (`kvmem.pipelines.four_views`): causal
    tracing, knowledge neurons, the memory fact view and a ROME edit with its CounterFact metrics,
    each with its figure, view and a sentence saying what it shows, then the time per step.

    `meta`: more key facts for the opening table (the model's name, ...; "ROME statistics" replaces
    the default "<n> tokens", e.g. to name the corpus).
    """
    from kvmem.pipelines.four_views import trace_peak

    fact = report.fact
    rep = Report(title or "kvmem: one fact, four views",
                 f"Fact: “{fact.prompt}” → {fact.target_true!r} (subject {fact.subject!r})")
    run = dict(meta or {})  # the caller's entries first; they may also replace these defaults
    for key, value in (("edit layer", report.edit.layer), ("noise samples", report.samples),
                       ("ROME statistics", f"{report.stats_tokens} tokens")):
        run.setdefault(key, value)
    rep.table([{"": k, "value": v} for k, v in run.items()], caption="Run")
    for remark in getattr(report, "remarks", ()):
        rep.text(f"Warning: {remark}.")
    _tracing_section(rep, report.traces, trace_peak)
    remark = report.peak_remark() if hasattr(report, "peak_remark") else None
    if remark:
        rep.text(f"Note: {remark[:1].upper()}{remark[1:]}.")
    _neurons_section(rep, report.neurons, report.effects)
    _memories_section(rep, report.memories)
    _edit_section(rep, report)
    if report.timings:
        rep.table([{"step": k, "seconds": round(v, 2)} for k, v in report.timings.items()], caption="Time")
    return rep


def _tracing_section(rep: Report, traces, trace_peak) -> None:
    rep.section("1. Causal tracing: where is the fact recalled?")
    lines = []
    for t in traces:
        layer, pos, ie = trace_peak(t)
        lines.append(f"{t.kind} peaks at layer {layer}, token {t.str_tokens[pos]!r} (indirect effect {ie:.2f})")
    rep.text(
        f"Noise on the subject's embeddings drops p({traces.traces[0].answer.strip()}) from "
        f"{traces.p_clean:.2f} to {traces.p_corrupt:.2f}; restoring one clean state brings it back where "
        f"that state carries the fact: " + "; ".join(lines) + "."
    )
    rep.figure(traces.plot(), "Restoring the residual stream, MLP and attention outputs (subject tokens marked *).")
    rep.view(traces.show(), "Interactive: pick a kind and a layer; tokens coloured by indirect effect.")


def _neurons_section(rep: Report, neurons, effects) -> None:
    rep.section("2. Knowledge neurons: which MLP neurons carry it?")
    rep.text(
        f"Integrated gradients over {len(neurons.prompts)} prompt(s) find {len(neurons)} neurons shared by at "
        f"least {neurons.share:.0%} of them, in layers {sorted(set(neurons.layers)) or '-'}."
    )
    for eff in effects:
        verb = "Suppressing" if eff.factor == 0 else f"Scaling ×{eff.factor:g}"
        rep.text(
            f"{verb} them changes p(answer) by {eff.relative_change:+.0%} "
            f"(random neurons of the same layers: {eff.control_relative_change:+.0%})."
        )
    if len(neurons):
        rep.table(neurons.to_frame().head(15), caption="Knowledge neurons")
    rep.figure(neurons.plot(), "Knowledge neurons per layer.")
    if effects:
        from kvmem.viz import figure_axes

        fig, axes = figure_axes(None, len(effects), figsize=(4 * len(effects), 3))
        for ax, eff in zip(axes, effects):
            eff.plot(ax=ax)
        fig.tight_layout()
        rep.figure(fig, "Relative change of p(answer): knowledge neurons vs random neurons.")
    if len(neurons):
        rep.view(neurons.show(0), f"Activation of neuron L{neurons.neurons[0][0]}.N{neurons.neurons[0][1]} over the prompts.")


def _memories_section(rep: Report, memories) -> None:
    rep.section("3. Key-value memories: which memories push the answer?")
    top = memories.top_memories(1, "subject_last") + memories.top_memories(1, "last")
    rep.text(
        "Each MLP neuron is a key (when it fires) and a value (what it writes, read through the unembedding). "
        f"The strongest push toward {memories.target!r} comes from "
        + " and ".join(f"L{l}.N{n} (push {p:.2f})" for l, n, p in top)
        + " at the subject's last token and the last token."
    )
    rep.figure(memories.plot(), "Each layer's push toward the answer (all memories, strongest single memory).")
    rep.view(memories.show(n=8), "Strongest memories and the tokens their values promote.")


def _edit_section(rep: Report, report) -> None:
    edit = report.edit
    rep.section("4. ROME: rewrite the fact")
    rep.text(
        f"A rank-one update of layer {edit.layer}'s MLP makes the model answer {edit.request.target_new!r} "
        f"instead of {edit.request.target_true!r} (computed in {edit.seconds:.1f} s)."
    )
    if report.answers:
        rep.table(list(report.answers), caption="Top-1 answers before and after the edit")
    summ = report.evaluation.summary().reset_index(names="condition")
    cols = ["condition", "S", "ES", "PS", "NS", "EM", "PM", "NM", "n"]
    rep.table(summ[[c for c in cols if c in summ]], caption="CounterFact metrics (×100)", floatfmt=".1f")
    missing = report.not_computed()
    if missing:
        rep.text("n/a: " + "; ".join(f"{m}: {why}" for m, why in missing.items()) + ".")
    rep.text(
        "ES: the rewrite prompt prefers the new object; PS: its paraphrases do; NS: other subjects "
        "keep their true object; S: their harmonic mean."
    )
    if edit.loss_trace.numel():
        from kvmem.viz import figure_axes

        fig, (ax,) = figure_axes(None, 1, figsize=(5, 3))
        frame = edit.trace_frame()
        ax.plot(frame.index, frame["loss"], "o-", label="loss")
        ax.plot(frame.index, frame["p_target"], "s-", label="p(new object)")
        ax.set_xlabel("optimisation step of v*")
        ax.legend()
        rep.figure(fig, "Optimising the value v*: loss and the new object's probability.")
