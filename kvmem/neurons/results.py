"""What the knowledge-neuron analyses return: an attribution, a fact's knowledge neurons, the
effect of scaling neurons. Each has `to_frame()`, `plot(ax=None, *, title=None)` (a matplotlib
Figure) and `show()` (an offline `kvmem.viz.HTMLView`), and prints as one short line."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem.errors import InvalidArgumentError
from kvmem.viz import HTMLView, figure_axes

Neuron = tuple[int, int]  # (layer, neuron index)


def _layer_list(layers) -> str:
    """'3, 11, 17' for a few layers, '0-17' for a run of many."""
    layers = sorted(set(layers))
    if len(layers) > 4 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(str(l) for l in layers)


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


@dataclass(frozen=True, repr=False)
class NeuronAttribution:
    """Integrated-gradients attribution of every neuron of `layers` for one prompt and target.

    `scores[i, n]` is neuron n of layer `layers[i]`. `prob` is f at the actual activations;
    `baseline_probs[i]` is f with layer `layers[i]`'s neurons at the baseline (last position).
    """

    prompt: str
    target: str
    str_tokens: tuple[str, ...]
    target_ids: tuple[int, ...]
    layers: tuple[int, ...]
    scores: Float[Tensor, "layer d_mlp"] = field(repr=False)
    activations: Float[Tensor, "layer d_mlp"] = field(repr=False)
    baseline: Float[Tensor, "layer d_mlp"] = field(repr=False)
    prob: float
    baseline_probs: Float[Tensor, "layer"] = field(repr=False)
    steps: int
    rule: str
    site: str

    def __repr__(self) -> str:
        return (
            f"NeuronAttribution(prompt={_short(self.prompt)}, target={self.target!r}, "
            f"layers {_layer_list(self.layers)} x {self.scores.shape[1]} neurons, p={self.prob:.4g}, "
            f"{self.steps} steps, rule={self.rule!r}, site={self.site!r})"
        )

    @property
    def completeness_gap(self) -> Float[Tensor, "layer"]:
        """Per layer: sum of attributions minus (f(x) - f(baseline)); the quadrature error."""
        return self.scores.sum(-1) - (self.prob - self.baseline_probs)

    def neurons_above(self, threshold: float = 0.2) -> list[Neuron]:
        """(layer, neuron) pairs with score > threshold x the maximum score (Dai et al.'s t)."""
        top = float(self.scores.max())
        if top <= 0:
            return []
        idx = torch.nonzero(self.scores > threshold * top)
        return [(self.layers[int(i)], int(n)) for i, n in idx]

    def top(self, k: int = 10):
        """The k highest-scoring neurons as a DataFrame."""
        import pandas as pd

        flat = self.scores.flatten()
        vals, idx = flat.topk(min(k, flat.numel()))
        d = self.scores.shape[1]
        return pd.DataFrame({
            "layer": [self.layers[int(i) // d] for i in idx],
            "neuron": [int(i) % d for i in idx],
            "score": vals.tolist(),
            "activation": self.activations.flatten()[idx].tolist(),
        })

    def to_frame(self):
        """One row per (layer, neuron): score, activation, baseline."""
        import pandas as pd

        n_layers, d = self.scores.shape
        return pd.DataFrame({
            "layer": torch.tensor(self.layers).repeat_interleave(d).tolist(),
            "neuron": torch.arange(d).repeat(n_layers).tolist(),
            "score": self.scores.flatten().tolist(),
            "activation": self.activations.flatten().tolist(),
            "baseline": self.baseline.flatten().tolist(),
        })

    def plot(self, ax=None, *, title: str | None = None):
        """Heatmap of attributions, layer x neuron (diverging colours, zero is white)."""
        fig, (ax,) = figure_axes(ax, 1, figsize=(10, 0.25 * len(self.layers) + 1.5))
        lim = float(self.scores.abs().max()) or 1.0
        im = ax.imshow(self.scores.float().numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                       interpolation="nearest")
        ax.set_yticks(range(len(self.layers)), [str(l) for l in self.layers])
        ax.set_xlabel("neuron")
        ax.set_ylabel("layer")
        ax.set_title(title or f"IG attribution to p({self.target!r} | {self.prompt!r})"[:100])
        fig.colorbar(im, ax=ax, label="attribution")
        return fig

    def show(self) -> HTMLView:
        """circuitsvis coloured tokens: each layer labelled by its largest attribution (offline HTML)."""
        from circuitsvis.tokens import colored_tokens

        labels = [f"L{l}" for l in self.layers]
        return HTMLView.from_circuitsvis(colored_tokens(labels, self.scores.max(-1).values.float()))


@dataclass(frozen=True, repr=False)
class KnowledgeNeurons:
    """The knowledge neurons of one fact: neurons above `threshold` x max attribution in at least
    `share` of its paraphrase prompts (and in at least `min_shared` of them).

    `share` is the share actually used (it differs from the one asked for when `target_count`
    adjusted it). `counts` says in how many prompts each coarse neuron passed the threshold.
    `activations[p, t, k]` is neuron `neurons[k]`'s activation at token t of prompt p (for `.show()`).
    """

    prompts: tuple[str, ...]
    target: str
    neurons: tuple[Neuron, ...]
    threshold: float
    share: float
    min_shared: int
    counts: dict
    attributions: tuple[NeuronAttribution, ...]
    str_tokens: tuple[tuple[str, ...], ...]
    activations: Float[Tensor, "prompt pos neuron"] = field(repr=False)

    def __repr__(self) -> str:
        where = f" in layers {_layer_list(self.layers)}" if self.neurons else ""
        return (
            f"KnowledgeNeurons(target={self.target!r}, {len(self.neurons)} neurons{where}, "
            f"{len(self.prompts)} prompts, share={self.share:.2g})"
        )

    def __len__(self) -> int:
        return len(self.neurons)

    @property
    def layers(self) -> list[int]:
        """The layer of each knowledge neuron (one entry per neuron)."""
        return [l for l, _ in self.neurons]

    def to_frame(self):
        """One row per knowledge neuron: layer, index, prompts sharing it, mean score and activation."""
        import pandas as pd

        rows = []
        for l, n in self.neurons:
            scores = [a.scores[a.layers.index(l), n].item() for a in self.attributions if l in a.layers]
            acts = [a.activations[a.layers.index(l), n].item() for a in self.attributions if l in a.layers]
            rows.append({
                "layer": l, "neuron": n, "n_prompts": self.counts.get((l, n), 0),
                "share": self.counts.get((l, n), 0) / len(self.prompts),
                "mean_score": sum(scores) / len(scores), "mean_activation": sum(acts) / len(acts),
            })
        return pd.DataFrame(rows, columns=["layer", "neuron", "n_prompts", "share", "mean_score", "mean_activation"])

    def plot(self, ax=None, *, title: str | None = None):
        """Bar chart: knowledge neurons per layer."""
        fig, (ax,) = figure_axes(ax, 1, figsize=(6, 3))
        all_layers = sorted({l for a in self.attributions for l in a.layers})
        c = Counter(self.layers)
        ax.bar(all_layers, [c.get(l, 0) for l in all_layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("knowledge neurons")
        ax.set_title(title or f"{len(self.neurons)} knowledge neurons for {self.target!r}")
        return fig

    def show(self, neuron: int | Neuron = 0) -> HTMLView:
        """circuitsvis coloured tokens of one knowledge neuron's activation over every prompt (offline).

        `neuron` is an index into `self.neurons` or a (layer, neuron) pair among them.
        """
        from circuitsvis.tokens import colored_tokens

        if not self.neurons:
            raise InvalidArgumentError("No knowledge neurons were found, so there is nothing to show.")
        if isinstance(neuron, tuple):
            if tuple(neuron) not in self.neurons:
                raise InvalidArgumentError(f"{neuron} is not one of the knowledge neurons {list(self.neurons)[:10]}.")
            k = self.neurons.index(tuple(neuron))
        else:
            k = int(neuron)
        if not 0 <= k < len(self.neurons):
            raise InvalidArgumentError(f"neuron index {k} out of range: {len(self.neurons)} knowledge neurons.")
        tokens, values = [], []
        for p, toks in enumerate(self.str_tokens):
            tokens.extend(list(toks) + ["\n"])
            values.extend(self.activations[p, : len(toks), k].tolist() + [0.0])
        return HTMLView.from_circuitsvis(colored_tokens(tokens, values))


@dataclass(frozen=True, repr=False)
class NeuronEffect:
    """p(gold target) per prompt before and after scaling `neurons` by `factor`, and for random
    control neurons (same count per layer, `control_neurons[d]` for draw d).

    `relative_change` is Dai et al.'s ratio (mean change / mean original probability over the
    prompts); `mean_relative_change` averages each prompt's own ratio.
    """

    prompts: tuple[str, ...]
    target: str
    neurons: tuple[Neuron, ...]
    factor: float
    positions: str
    p_before: Float[Tensor, "prompt"] = field(repr=False)
    p_after: Float[Tensor, "prompt"] = field(repr=False)
    control_neurons: tuple[tuple[Neuron, ...], ...]
    p_control: Float[Tensor, "draw prompt"] = field(repr=False)

    def __repr__(self) -> str:
        control = f", random neurons {self.control_relative_change:+.1%}" if self.p_control.shape[0] else ""
        return (
            f"NeuronEffect(target={self.target!r}, x{self.factor:g} on {len(self.neurons)} neurons at "
            f"{self.positions!r} positions, {len(self.prompts)} prompts: {self.relative_change:+.1%}{control})"
        )

    @property
    def relative_change(self) -> float:
        return float((self.p_after - self.p_before).sum() / self.p_before.sum())

    @property
    def control_relative_change(self) -> float:
        if self.p_control.shape[0] == 0:
            return float("nan")
        return float(((self.p_control - self.p_before).sum(-1) / self.p_before.sum()).mean())

    @property
    def mean_relative_change(self) -> float:
        return float(((self.p_after - self.p_before) / self.p_before).mean())

    def to_frame(self):
        """One row per prompt: p(target) before and after, its relative change, and the controls'."""
        import pandas as pd

        data = {"prompt": list(self.prompts), "p_before": self.p_before.tolist(), "p_after": self.p_after.tolist(),
                "relative_change": ((self.p_after - self.p_before) / self.p_before).tolist()}
        if self.p_control.shape[0]:
            pc = self.p_control.mean(0)
            data["p_control"] = pc.tolist()
            data["control_relative_change"] = ((pc - self.p_before) / self.p_before).tolist()
        return pd.DataFrame(data)

    def plot(self, ax=None, *, title: str | None = None):
        """Bars: relative change of the gold probability, chosen neurons vs random neurons."""
        fig, (ax,) = figure_axes(ax, 1, figsize=(4, 3))
        vals = [100 * self.relative_change, 100 * self.control_relative_change]
        ax.bar(["chosen neurons", "random neurons"], vals, color=["C3", "C7"])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("relative change of p(target), %")
        ax.set_title(title or f"x{self.factor:g} on {len(self.neurons)} neurons")
        return fig

    def show(self) -> HTMLView:
        """The per-prompt table (`to_frame()`) as offline HTML, headed by the overall change."""
        from html import escape

        head = f"<p>{escape(repr(self))}</p>"
        return HTMLView(head + self.to_frame().to_html(index=False, float_format=lambda v: f"{v:.4g}"))
