"""Knowledge neurons (Dai et al., ACL 2022): integrated gradients on MLP neurons, refinement over
paraphrases, and suppress / amplify interventions with a random-neuron control.

Definitions (what every number here means)
------------------------------------------
- **Objective** `f`: the probability of the gold target after the prompt. A multi-token target is
  teacher-forced with its gold tokens (never the model's argmax) and `f` is the *product* of the
  token probabilities, i.e. the probability of the whole target string
  `p(t_1 | prompt) * p(t_2 | prompt, t_1) * ...`. For a one-token target this is Dai et al.'s
  objective exactly.
- **Neurons**: `blocks.{l}.mlp.hook_post` (the key coefficients, gated product included) at the
  *last prompt position*, the position that predicts the first target token (Dai et al. use the
  `[MASK]` position). `site="pre"` uses `hook_pre` instead (the pre-activation; what the
  EleutherAI `knowledge-neurons` package patches on GPT-2, `mlp.c_fc`'s output).
- **Integrated gradients**: for layer l, the path `h(a) = b + a (x - b)` from the baseline `b`
  (zeros by default) to the actual activation `x` of that layer's neurons at the last position, all
  other layers left to compute normally; `IG_i = (x_i - b_i) * sum_k w_k df/dh_i(h(a_k))`.
  Completeness: `sum_i IG_i ~= f(x) - f(b)` for every layer, up to the quadrature error below.
- **Riemann rule** (`rule=`): nodes `a_k` and weights `w_k` over m = `steps` intervals:

  ============  =================================  ===================================
  rule          nodes                              error of sum_i IG_i vs f(x) - f(b)
  ============  =================================  ===================================
  "midpoint"    (k + 1/2)/m, k = 0..m-1 (default)  <= max|g'''| / (24 m^2)
  "left"        k/m, k = 0..m-1 (Dai et al.'s      <= max|g''| / (2 m)
                code: `baseline + step * i`)
  "right"       k/m, k = 1..m                      <= max|g''| / (2 m)
  "trapezoid"   k/m, k = 0..m (m + 1 nodes)        <= max|g'''| / (12 m^2)
  "linspace"    linspace(0, 1, m), each weight 1/m  O(1/m), no clean bound (EleutherAI's
                                                   `knowledge-neurons`; includes a = 1)
  "geometric"   midpoints of [0, a_min] and of      sum over intervals of
                m - 1 log-spaced intervals from     max|g''| w_k^3 / 24 (w_k: widths;
                a_min = 1e-6 to 1, weights = widths exact for linear g)
  ============  =================================  ===================================

  with g(a) = f(h(a)). The default `rule="auto"` is the midpoint rule (the same cost as Dai et
  al.'s left rule, with a second-order error), or the geometric rule on models that normalise the
  MLP output (below); `rule="left"` reproduces Dai et al.'s definition.

  Models with a norm after the MLP (Gemma-2/3's `ln2_post`) need the geometric rule: the norm
  makes the layer's output nearly scale-invariant, so g(a) is flat from a ~ 1e-2 to 1 and all of
  f(x) - f(0) happens below that (an RMSNorm only stops normalising when a·‖out‖ nears sqrt(eps)),
  where uniform nodes hardly look. Log-spaced nodes resolve it
  (`benchmarks/results/neurons_speed_gemma-3-270m.md` compares the rules).

How it is computed
------------------
All layers and all steps of one prompt in as few batched forward/backward passes as memory allows
(usually one). Row (l, a) scales layer l only; every other layer computes normally. Because the
patch is at the last prompt position of layer l:

- a row for layer l starts at layer l from the clean run's residual (layers < l are clean);
- a row runs only the positions from the last prompt token on (one position for a one-token
  target), attending to the clean run's keys/values of earlier positions through TransformerLens's
  key/value-cache path (rotary offsets, grouped-query attention and local windows are the model's
  own code);
- rows join the batch at their layer, so block j runs once, with exactly the rows that need it;
- only the positions that predict target tokens are unembedded;
- one backward pass gives every row's gradient (rows are independent, so the gradient of the sum
  of their objectives is each row's own gradient).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kvmem.errors import EmptyTargetError, InvalidArgumentError, LayerOutOfRangeError, PromptTooLongError
from kvmem.core.hooks import scale_neurons
from kvmem.core.facts import Fact
from kvmem.core.tokenize import encode, pad_batch, spec_for, target_token_ids
from kvmem.core.readout import final_logits
from kvmem.core.weights import check_layer, mlp_post_norm

RULES: tuple[str, ...] = ("midpoint", "left", "right", "trapezoid", "linspace", "geometric")  # + "auto"
GEOMETRIC_MIN = 1e-6  # the geometric rule's smallest log-spaced node
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of activations per batched pass

Neuron = tuple[int, int]  # (layer, neuron index)


# --------------------------------------------------------------------------------------------
# Quadrature
# --------------------------------------------------------------------------------------------

def resolve_rule(model, rule: str, layers: Sequence[int] | None = None) -> str:
    """`rule`, with "auto" made concrete: "geometric" when any of `layers` (default all) normalises
    its MLP output (Gemma-2/3's `ln2_post`: the uniform path is degenerate there, module docstring),
    else "midpoint"."""
    if rule != "auto":
        return rule
    chosen = range(model.cfg.n_layers) if layers is None else layers
    return "geometric" if any(mlp_post_norm(model, l) is not None for l in chosen) else "midpoint"


def riemann_nodes(steps: int, rule: str = "midpoint") -> tuple[Float[Tensor, "node"], Float[Tensor, "node"]]:
    """Nodes `a_k` in [0, 1] and weights `w_k` of the rule (see the module docstring), float64."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be an integer >= 1 (Dai et al. use 20), got {steps!r}.")
    if rule not in RULES:
        raise InvalidArgumentError(f"Unknown rule {rule!r}; use one of {', '.join(RULES)}.")
    m = steps
    k = torch.arange(m, dtype=torch.float64)
    if rule == "midpoint":
        return (k + 0.5) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if rule == "left":
        return k / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if rule == "right":
        return (k + 1) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if rule == "trapezoid":
        w = torch.full((m + 1,), 1.0 / m, dtype=torch.float64)
        w[0] = w[-1] = 0.5 / m
        return torch.arange(m + 1, dtype=torch.float64) / m, w
    if rule == "geometric":
        if m < 2:
            raise InvalidArgumentError("rule='geometric' needs steps >= 2 (one node below a_min, the rest log-spaced).")
        # intervals [0, a_min], then m - 1 log-spaced up to 1; midpoint of each, weight its width
        lo = math.log(GEOMETRIC_MIN)
        edges = (lo * (1 - torch.arange(m, dtype=torch.float64) / (m - 1))).exp()
        edges = torch.cat([torch.zeros(1, dtype=torch.float64), edges])
        edges[-1] = 1.0
        return (edges[:-1] + edges[1:]) / 2, edges[1:] - edges[:-1]
    # EleutherAI's knowledge-neurons: torch.linspace(0, 1, steps), gradients summed, times x / steps.
    nodes = torch.linspace(0, 1, m, dtype=torch.float64) if m > 1 else torch.zeros(1, dtype=torch.float64)
    return nodes, torch.full((m,), 1.0 / m, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Prepared:
    prompt: str
    target: str
    tokens: Int[Tensor, "pos"]  # prompt + all but the last target token
    last_pos: int  # the last prompt position (predicts the first target token)
    target_ids: tuple[int, ...]
    str_tokens: tuple[str, ...]


def _prompt_and_target(prompt: str | Fact, target: str | None) -> tuple[str, str]:
    if isinstance(prompt, Fact):
        if target is None:
            target = prompt.target("true")
        elif prompt.target_true is not None and prompt.target_true.strip() != target.strip():
            raise InvalidArgumentError(
                f"The Fact's target_true {prompt.target_true!r} differs from target={target!r}; "
                "pass one of them (or make them equal)."
            )
        prompt = prompt.prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidArgumentError(f"prompt must be a non-empty string or a kvmem.Fact, got {prompt!r}.")
    if target is None:
        raise EmptyTargetError("No target given; pass target='Paris' (or a Fact with target_true).")
    if not isinstance(target, str) or not target.strip():
        raise EmptyTargetError(f"Target {target!r} is empty; give the answer text, e.g. 'Paris'.")
    return prompt, target


def _prepare(model, prompt: str | Fact, target: str | None, prepend_bos: bool | None = None) -> _Prepared:
    """Tokenize one prompt with its teacher-forced gold target, checking the target is usable."""
    prompt, target = _prompt_and_target(prompt, target)
    spec = spec_for(model)
    prompt_ids = encode(spec, prompt, prepend_bos=prepend_bos)
    tids = target_token_ids(spec, prompt, target)
    # The target must continue the prompt's own tokens: where appending it re-tokenizes the
    # prompt's end (a prompt ending in a space, a target glued to the last word), the model would
    # never see these tokens after this prompt.
    joint_text = prompt + ("" if target[0].isspace() or prompt[-1].isspace() else " ") + target
    raw_prompt = encode(spec, prompt, prepend_bos=False)
    raw_joint = encode(spec, joint_text, prepend_bos=False)
    if raw_joint[: len(raw_prompt)] != raw_prompt:
        raise InvalidArgumentError(
            f"Appending target {target!r} changes how prompt {prompt!r} is tokenized at the junction, "
            "so the target is not tokenizable as given after this prompt; remove trailing spaces from "
            "the prompt (kvmem adds the space before the target) or split words differently."
        )
    decoded = spec.tokenizer.decode(list(tids))
    if decoded.strip() != target.strip():
        raise InvalidArgumentError(
            f"Target {target!r} does not survive tokenization (it decodes back as {decoded!r}); "
            "use characters the tokenizer knows."
        )
    tokens = prompt_ids + list(tids[:-1])
    if len(tokens) > spec.n_ctx:
        raise PromptTooLongError(
            f"Prompt {prompt[:60]!r} plus target needs {len(tokens)} tokens but the model's context is "
            f"{spec.n_ctx}; shorten the prompt or the target."
        )
    str_tokens = tuple(spec.tokenizer.decode([i]) for i in prompt_ids)
    return _Prepared(prompt, target, torch.tensor(tokens, dtype=torch.long), len(prompt_ids) - 1,
                     tuple(int(i) for i in tids), str_tokens)


def _layers(model, layers: int | Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(model.cfg.n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    out = sorted({check_layer(model, l) for l in layers})
    if not out:
        raise InvalidArgumentError("layers is empty; pass None (all layers) or some layer indices.")
    return out


def _site_hook(layer: int, site: str) -> str:
    if site not in ("post", "pre"):
        raise InvalidArgumentError(f"site must be 'post' (hook_post, default) or 'pre' (hook_pre), got {site!r}.")
    return f"blocks.{layer}.mlp.hook_{site}"


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
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
    scores: Float[Tensor, "layer d_mlp"]
    activations: Float[Tensor, "layer d_mlp"]
    baseline: Float[Tensor, "layer d_mlp"]
    prob: float
    baseline_probs: Float[Tensor, "layer"]
    steps: int
    rule: str
    site: str

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
        flat = self.scores.flatten()
        vals, idx = flat.topk(min(k, flat.numel()))
        d = self.scores.shape[1]
        import pandas as pd

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

    def plot(self, ax=None):
        """Heatmap of attributions, layer x neuron (diverging colors, zero is white)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(10, 0.25 * len(self.layers) + 1.5))
        lim = float(self.scores.abs().max()) or 1.0
        im = ax.imshow(self.scores.float().numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                       interpolation="nearest")
        ax.set_yticks(range(len(self.layers)), [str(l) for l in self.layers])
        ax.set_xlabel("neuron")
        ax.set_ylabel("layer")
        ax.set_title(f"IG attribution to p({self.target!r} | {self.prompt!r})"[:100])
        ax.figure.colorbar(im, ax=ax, label="attribution")
        return ax.figure

    def show(self):
        """circuitsvis colored tokens: each layer labelled by its largest attribution (offline HTML)."""
        from circuitsvis.tokens import colored_tokens

        labels = [f"L{l}" for l in self.layers]
        return _Html(colored_tokens(labels, self.scores.max(-1).values.float()).local_src)


class _Html:
    """circuitsvis output rendered from its inlined (offline) source, never the CDN."""

    def __init__(self, src: str):
        self.src = src

    def _repr_html_(self) -> str:
        return self.src

    def __str__(self) -> str:
        return self.src


# --------------------------------------------------------------------------------------------
# The batched engine
# --------------------------------------------------------------------------------------------

def _entry_cls():
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    return TransformerLensKeyValueCacheEntry


def _clean_run(model, tokens: Int[Tensor, "batch pos"], sites: list[str]):
    """One clean forward run through the blocks, keeping each layer's input residual, its keys
    and values (as the cache stores them) and the `sites` activations."""
    Entry = _entry_cls()
    with torch.no_grad():
        resid, _, shortformer, _ = model.input_to_embed(tokens)
        entries = [Entry.init_cache_entry(model.cfg, resid.device, tokens.shape[0]) for _ in model.blocks]
        resid_pre, acts = [], {}

        def keep(act, hook):
            acts[hook.name] = act.detach()
            return act

        with model.hooks(fwd_hooks=[(s, keep) for s in sites]):
            for j, block in enumerate(model.blocks):
                resid_pre.append(resid)
                resid = block(resid, shortformer_pos_embed=shortformer, past_kv_cache_entry=entries[j])
    return resid_pre, resid, entries, shortformer, acts


def _at_least_f32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _target_logprob(model, resid: Float[Tensor, "row pos d_model"], target_ids: Tensor) -> Float[Tensor, "row"]:
    """Sum over target tokens of log p(token); `resid[:, t]` predicts `target_ids[t]`."""
    rows, n_t = resid.shape[0], target_ids.shape[0]
    logits = _at_least_f32(final_logits(model, resid[:, :n_t].reshape(rows * n_t, -1)))
    logp = logits.log_softmax(-1).gather(1, target_ids.repeat(rows)[:, None])[:, 0]
    return logp.view(rows, n_t).sum(-1)


def _rows_per_pass(model, n_layers: int, n_target: int, n_nodes: int, max_rows: int | None) -> int:
    if max_rows is not None:
        if max_rows < 1:
            raise InvalidArgumentError("max_rows must be at least 1.")
        return max(1, min(n_nodes, max_rows // n_layers))
    cfg = model.cfg
    per_row = 4 * n_target * (3 * cfg.d_vocab + cfg.n_layers * (8 * cfg.d_mlp + 16 * cfg.d_model))
    return max(1, min(n_nodes, DEFAULT_MEMORY_BUDGET // max(1, per_row * n_layers)))


def _ig_prepared(
    model,
    prep: _Prepared,
    layers: list[int],
    steps: int,
    baseline: str | Tensor,
    rule: str,
    site: str,
    max_rows: int | None,
    progress: bool,
) -> NeuronAttribution:
    nodes, weights = riemann_nodes(steps, rule)
    device = model.cfg.device if model.cfg.device is not None else "cpu"
    names = [_site_hook(l, site) for l in layers]
    tokens = prep.tokens.to(device)[None]
    P = prep.last_pos
    resid_pre, resid_final, entries, shortformer, acts = _clean_run(model, tokens, names)
    x = torch.stack([acts[n][0, P] for n in names])  # [layer, d_mlp]
    if isinstance(baseline, str):
        if baseline != "zero":
            raise InvalidArgumentError(f"baseline must be 'zero' or a [layer, d_mlp] tensor, got {baseline!r}.")
        b = torch.zeros_like(x)
    else:
        if not isinstance(baseline, Tensor) or tuple(baseline.shape) != tuple(x.shape):
            raise InvalidArgumentError(
                f"baseline tensor must have shape {tuple(x.shape)} ([len(layers), d_mlp]), "
                f"got {tuple(getattr(baseline, 'shape', ()))}."
            )
        b = baseline.to(device=x.device, dtype=x.dtype)
    target = torch.tensor(prep.target_ids, device=x.device)
    with torch.no_grad():
        prob = float(_target_logprob(model, resid_final[:, P:], target).exp()[0])

    # Nodes, plus a = 0 when the rule lacks it, so f(baseline) comes for free.
    has_zero = bool((nodes == 0).any())
    all_nodes = nodes if has_zero else torch.cat([nodes, torch.zeros(1, dtype=nodes.dtype)])
    n_nodes = len(all_nodes)
    per_pass = _rows_per_pass(model, len(layers), len(prep.target_ids), n_nodes, max_rows)
    grads = torch.zeros(len(layers), n_nodes, x.shape[-1], dtype=torch.float64)
    probs = torch.zeros(len(layers), n_nodes, dtype=torch.float64)
    Entry = _entry_cls()
    suffix_sf = None if shortformer is None else shortformer[:, P:]
    chunks = [list(range(i, min(i + per_pass, n_nodes))) for i in range(0, n_nodes, per_pass)]
    first = layers[0]
    for chunk in tqdm(chunks, disable=not progress, desc="integrated gradients"):
        c = len(chunk)
        alpha = all_nodes[chunk].to(device=x.device, dtype=x.dtype)[:, None]  # [c, 1]
        hs = [(b[i] + alpha * (x[i] - b[i])).detach().requires_grad_(True) for i in range(len(layers))]

        def make_hook(i):
            def hook(act, hook=None):
                out = act.clone()
                out[i * c : (i + 1) * c, 0] = hs[i].to(act.dtype)
                return out

            return hook

        resid = None
        with model.hooks(fwd_hooks=[(n, make_hook(i)) for i, n in enumerate(names)]):
            li = 0
            for j in range(first, model.cfg.n_layers):
                if li < len(layers) and layers[li] == j:
                    new = resid_pre[j][:, P:].expand(c, -1, -1)
                    resid = new if resid is None else torch.cat([resid, new])
                    li += 1
                rows = resid.shape[0]
                ent = entries[j]
                entry = Entry(ent.past_keys[:, :P].expand(rows, -1, -1, -1),
                              ent.past_values[:, :P].expand(rows, -1, -1, -1), frozen=True)
                sf = None if suffix_sf is None else suffix_sf.expand(rows, -1, -1)
                resid = model.blocks[j](resid, shortformer_pos_embed=sf, past_kv_cache_entry=entry)
        p_rows = _target_logprob(model, resid, target).exp()
        g = torch.autograd.grad(p_rows.sum(), hs)
        for i in range(len(layers)):
            grads[i, chunk] = g[i].detach().double().cpu()
            probs[i, chunk] = p_rows[i * c : (i + 1) * c].detach().double().cpu()
    w = weights.to(grads.dtype)
    integral = torch.einsum("lkd,k->ld", grads[:, : len(nodes)], w)
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    scores = ((x - b).double().cpu() * integral).to(out_dtype)
    zero_col = int(torch.nonzero(all_nodes == 0)[0])
    return NeuronAttribution(
        prompt=prep.prompt,
        target=prep.target,
        str_tokens=prep.str_tokens,
        target_ids=prep.target_ids,
        layers=tuple(layers),
        scores=scores,
        activations=x.detach().cpu().to(out_dtype),
        baseline=b.detach().cpu().to(out_dtype),
        prob=prob,
        baseline_probs=probs[:, zero_col].to(out_dtype),
        steps=steps,
        rule=rule,
        site=site,
    )


def integrated_gradients(
    model,
    prompt: str | Fact,
    target: str | None = None,
    layers: int | Sequence[int] | None = None,
    steps: int = 20,
    baseline: str | Float[Tensor, "layer d_mlp"] = "zero",
    rule: str = "auto",
    site: str = "post",
    max_rows: int | None = None,
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> NeuronAttribution:
    """Integrated gradients of p(gold target | prompt) w.r.t. each MLP neuron at the last prompt position.

    `layers`: None for all (or an int / list); `steps`: m, the number of Riemann intervals;
    `baseline`: "zero" (Dai et al.) or a `[len(layers), d_mlp]` tensor; `rule`: "auto" (default:
    "geometric" on models that normalise the MLP output, like Gemma-3, else "midpoint"), "midpoint",
    "left" (Dai et al.), "right", "trapezoid", "linspace" (EleutherAI) or "geometric"; `site`: "post" (hook_post,
    default) or "pre" (hook_pre); `max_rows`: cap on rows (layer x step pairs) per batched pass
    (default: fit ~1 GiB). Multi-token targets are teacher-forced with the gold tokens and scored by
    the product of their probabilities. See the module docstring for the exact definitions.
    """
    prep = _prepare(model, prompt, target, prepend_bos)
    chosen = _layers(model, layers)
    rule = resolve_rule(model, rule, chosen)
    riemann_nodes(steps, rule)  # validate early
    return _ig_prepared(model, prep, chosen, steps, baseline, rule, site, max_rows, progress)


# --------------------------------------------------------------------------------------------
# Refinement over paraphrases
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KnowledgeNeurons:
    """The knowledge neurons of one fact: neurons above `threshold` x max attribution in at least
    `share` of its paraphrase prompts (and in at least `min_shared` of them).

    `share` is the share actually used (it differs from the one asked for when `target_count`
    adjusted it). `counts` says in how many prompts each coarse neuron passed the threshold.
    `activations[p, t, k]` is neuron `neurons[k]`'s hook_post at token t of prompt p (for `.show()`).
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
    activations: Float[Tensor, "prompt pos neuron"]

    def __len__(self) -> int:
        return len(self.neurons)

    @property
    def layers(self) -> list[int]:
        return [l for l, _ in self.neurons]

    def to_frame(self):
        """One row per knowledge neuron: layer, index, prompts sharing it, mean score and activation."""
        import pandas as pd

        rows = []
        for k, (l, n) in enumerate(self.neurons):
            scores = [a.scores[a.layers.index(l), n].item() for a in self.attributions if l in a.layers]
            acts = [a.activations[a.layers.index(l), n].item() for a in self.attributions if l in a.layers]
            rows.append({
                "layer": l, "neuron": n, "n_prompts": self.counts.get((l, n), 0),
                "share": self.counts.get((l, n), 0) / len(self.prompts),
                "mean_score": sum(scores) / len(scores), "mean_activation": sum(acts) / len(acts),
            })
        return pd.DataFrame(rows, columns=["layer", "neuron", "n_prompts", "share", "mean_score", "mean_activation"])

    def plot(self, ax=None):
        """Bar chart: knowledge neurons per layer."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3))
        all_layers = sorted({l for a in self.attributions for l in a.layers})
        c = Counter(self.layers)
        ax.bar(all_layers, [c.get(l, 0) for l in all_layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("knowledge neurons")
        ax.set_title(f"{len(self.neurons)} knowledge neurons for {self.target!r}")
        return ax.figure

    def show(self, neuron: int | Neuron = 0):
        """circuitsvis colored tokens of one knowledge neuron's activation over every prompt (offline).

        `neuron` is an index into `self.neurons` or a (layer, neuron) pair among them.
        """
        from circuitsvis.tokens import colored_tokens

        if not self.neurons:
            raise InvalidArgumentError("No knowledge neurons were found, so there is nothing to show.")
        k = self.neurons.index(tuple(neuron)) if isinstance(neuron, tuple) else int(neuron)
        if not 0 <= k < len(self.neurons):
            raise InvalidArgumentError(f"neuron index {k} out of range: {len(self.neurons)} knowledge neurons.")
        tokens, values = [], []
        for p, toks in enumerate(self.str_tokens):
            tokens.extend(list(toks) + ["\n"])
            values.extend(self.activations[p, : len(toks), k].tolist() + [0.0])
        return _Html(colored_tokens(tokens, values).local_src)


def _check_share(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise InvalidArgumentError(f"{name} must be a number in (0, 1], got {value!r}.")
    return float(value)


def refine(
    coarse: Sequence[Sequence[Neuron]],
    share: float = 0.7,
    min_shared: int = 1,
    target_count: tuple[int, int] | None = None,
    share_step: float = 0.05,
    max_adjust: int = 6,
) -> tuple[list[Neuron], float, Counter]:
    """Neurons in at least max(share x n_prompts, min_shared) of the per-prompt `coarse` sets.

    With `target_count=(lo, hi)` the share is moved by `share_step` (down when fewer than lo
    neurons survive, up when more than hi), at most `max_adjust` times, as Dai et al.'s code does
    (they adjust the per-relation average to 2..5; here it is per fact).
    """
    counts: Counter = Counter()
    for neurons in coarse:
        counts.update(set(map(tuple, neurons)))
    n = len(coarse)

    def kept(s: float) -> list[Neuron]:
        need = max(s * n, min_shared)
        return sorted(k for k, v in counts.items() if v >= need - 1e-9)

    out = kept(share)
    if target_count is not None:
        lo, hi = target_count
        if lo > hi or lo < 0:
            raise InvalidArgumentError(f"target_count must be (lo, hi) with 0 <= lo <= hi, got {target_count!r}.")
        for _ in range(max_adjust):
            if len(out) < lo:
                share = max(share - share_step, 1e-9)
            elif len(out) > hi:
                share = min(share + share_step, 1.0)
            else:
                break
            out = kept(share)
    return out, share, counts


def _bag(prompts: Sequence[str | Fact], target: str | None) -> tuple[list[str], str]:
    if isinstance(prompts, (str, Fact)):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InvalidArgumentError("Pass at least one prompt (Dai et al. use a fact's paraphrases).")
    targets = {p.target_true.strip() for p in prompts if isinstance(p, Fact) and p.target_true is not None}
    if target is not None:
        if not isinstance(target, str) or not target.strip():
            raise EmptyTargetError(f"Target {target!r} is empty; give the answer text, e.g. 'Paris'.")
        targets.add(target.strip())
    if len(targets) > 1:
        raise InvalidArgumentError(
            f"The prompts of one fact must share one target, got {sorted(targets)}; "
            "call once per fact (group prompts by their answer)."
        )
    if not targets:
        raise EmptyTargetError("No target given; pass target='Paris' (or Facts with target_true).")
    tgt = target if target is not None else next(
        p.target_true for p in prompts if isinstance(p, Fact) and p.target_true is not None)
    texts = [p.prompt if isinstance(p, Fact) else p for p in prompts]
    if len(set(texts)) != len(texts):
        raise InvalidArgumentError("The prompts contain duplicates; pass each paraphrase once.")
    return texts, tgt


def knowledge_neurons(
    model,
    prompts: Sequence[str | Fact],
    target: str | None = None,
    threshold: float = 0.2,
    share: float = 0.7,
    min_shared: int = 1,
    target_count: tuple[int, int] | None = None,
    layers: int | Sequence[int] | None = None,
    steps: int = 20,
    rule: str = "auto",
    baseline: str = "zero",
    site: str = "post",
    max_rows: int | None = None,
    progress: bool = True,
) -> KnowledgeNeurons:
    """Dai et al.'s knowledge neurons of one fact from its paraphrase prompts.

    Per prompt, keep neurons with attribution > `threshold` x that prompt's maximum (t = 0.2);
    keep neurons kept in at least `share` of the prompts (p = 0.7; Dai et al. also require 3
    prompts, `min_shared=3`). `target_count=(2, 5)` adjusts the share to land in that range
    (Dai et al.'s code does this per relation). Prompts given as Facts must share one target.
    """
    threshold = _check_share("threshold", threshold)
    share = _check_share("share", share)
    if isinstance(min_shared, bool) or not isinstance(min_shared, int) or min_shared < 1:
        raise InvalidArgumentError(f"min_shared must be an integer >= 1, got {min_shared!r}.")
    texts, tgt = _bag(prompts, target)
    chosen = _layers(model, layers)
    preps = [_prepare(model, p, tgt) for p in texts]
    rule = resolve_rule(model, rule, chosen)
    riemann_nodes(steps, rule)
    attrs = tuple(
        _ig_prepared(model, p, chosen, steps, baseline, rule, site, max_rows, False)
        for p in tqdm(preps, disable=not progress, desc="knowledge neurons")
    )
    coarse = [a.neurons_above(threshold) for a in attrs]
    neurons, used_share, counts = refine(coarse, share, min_shared, target_count)
    acts, str_tokens = _neuron_activations(model, texts, neurons, site)
    return KnowledgeNeurons(
        prompts=tuple(texts), target=tgt, neurons=tuple(neurons), threshold=threshold, share=used_share,
        min_shared=min_shared, counts=dict(counts), attributions=attrs, str_tokens=str_tokens,
        activations=acts,
    )


@torch.no_grad()
def _neuron_activations(model, prompts: Sequence[str], neurons: Sequence[Neuron], site: str = "post"):
    spec = spec_for(model)
    rows = [encode(spec, p) for p in prompts]
    batch = pad_batch(rows, spec.pad_id)
    str_tokens = tuple(tuple(spec.tokenizer.decode([i]) for i in r) for r in rows)
    out = torch.zeros(len(prompts), batch.tokens.shape[1], len(neurons))
    if not neurons:
        return out, str_tokens
    by_layer = defaultdict(list)
    for k, (l, n) in enumerate(neurons):
        by_layer[l].append((k, n))
    kept = {}

    def keep(act, hook):
        kept[hook.name] = act.detach()
        return act

    names = [_site_hook(l, site) for l in by_layer]
    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        model(batch.tokens.to(model.cfg.device), stop_at_layer=max(by_layer) + 1)
    for l, items in by_layer.items():
        act = kept[_site_hook(l, site)].float().cpu()
        for k, n in items:
            out[:, :, k] = act[:, :, n]
    return out, str_tokens


# --------------------------------------------------------------------------------------------
# Interventions
# --------------------------------------------------------------------------------------------

def _neuron_list(model, neurons) -> list[Neuron]:
    if isinstance(neurons, KnowledgeNeurons):
        neurons = neurons.neurons
    out = []
    for item in neurons:
        try:
            l, n = item
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"Neurons are (layer, index) pairs, got {item!r}.") from None
        l = check_layer(model, int(l))
        if not 0 <= int(n) < model.cfg.d_mlp:
            raise LayerOutOfRangeError(f"neuron {n} of layer {l} out of range: MLPs have 0..{model.cfg.d_mlp - 1}.")
        out.append((l, int(n)))
    if len(set(out)) != len(out):
        raise InvalidArgumentError("The neuron list has duplicates; pass each (layer, neuron) once.")
    return out


def scaling_hooks(
    model,
    neurons: Sequence[Neuron],
    factor: float | int,
    positions: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
) -> list[tuple[str, object]]:
    """`fwd_hooks` multiplying each (layer, neuron)'s hook_post by `factor` at `positions` (None: all).

    Use as `model.run_with_hooks(tokens, fwd_hooks=scaling_hooks(model, kn, 0.0, positions=[last]))`.
    """
    by_layer = defaultdict(list)
    for l, n in _neuron_list(model, neurons):
        by_layer[l].append(n)
    return [(_site_hook(l, "post"), scale_neurons(positions, ns, float(factor), rows)) for l, ns in sorted(by_layer.items())]


def random_neurons(model, neurons: Sequence[Neuron], seed: int = 0) -> list[Neuron]:
    """As many random neurons per layer as `neurons` has, avoiding them (seeded torch.Generator)."""
    gen = torch.Generator().manual_seed(int(seed))
    by_layer = Counter(l for l, _ in neurons)
    taken = set(neurons)
    out = []
    for l in sorted(by_layer):
        perm = torch.randperm(model.cfg.d_mlp, generator=gen).tolist()
        pick = [n for n in perm if (l, n) not in taken][: by_layer[l]]
        out.extend((l, n) for n in pick)
    return out


@dataclass(frozen=True)
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
    p_before: Float[Tensor, "prompt"]
    p_after: Float[Tensor, "prompt"]
    control_neurons: tuple[tuple[Neuron, ...], ...]
    p_control: Float[Tensor, "draw prompt"]

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
        import pandas as pd

        data = {"prompt": list(self.prompts), "p_before": self.p_before.tolist(), "p_after": self.p_after.tolist(),
                "relative_change": ((self.p_after - self.p_before) / self.p_before).tolist()}
        if self.p_control.shape[0]:
            pc = self.p_control.mean(0)
            data["p_control"] = pc.tolist()
            data["control_relative_change"] = ((pc - self.p_before) / self.p_before).tolist()
        return pd.DataFrame(data)

    def plot(self, ax=None):
        """Bars: relative change of the gold probability, knowledge neurons vs random neurons."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(4, 3))
        vals = [100 * self.relative_change, 100 * self.control_relative_change]
        ax.bar(["chosen neurons", "random neurons"], vals, color=["C3", "C7"])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("relative change of p(target), %")
        ax.set_title(f"x{self.factor:g} on {len(self.neurons)} neurons")
        return ax.figure


@torch.no_grad()
def _gold_probs(
    model,
    preps: Sequence[_Prepared],
    neuron_sets: Sequence[Sequence[Neuron] | None],
    factor: float,
    positions: str,
    batch_size: int,
) -> Float[Tensor, "set prompt"]:
    """p(target) of every prompt under each neuron set (None: no intervention), batched."""
    spec = spec_for(model)
    jobs = [(s, p) for s in range(len(neuron_sets)) for p in range(len(preps))]
    out = torch.zeros(len(neuron_sets), len(preps), dtype=torch.float64)
    device = model.cfg.device
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        batch = pad_batch([preps[p].tokens for _, p in chunk], spec.pad_id)
        hooks = []
        groups = defaultdict(list)  # (set, position or None) -> rows
        for r, (s, p) in enumerate(chunk):
            if neuron_sets[s]:
                groups[(s, preps[p].last_pos if positions == "last" else None)].append(r)
        for (s, pos), rows in groups.items():
            hooks += scaling_hooks(model, neuron_sets[s], factor, None if pos is None else [pos], rows)
        with model.hooks(fwd_hooks=hooks):
            resid = model(batch.tokens.to(device), stop_at_layer=model.cfg.n_layers)
        row_idx, pos_idx, ids, owner = [], [], [], []
        for r, (_, p) in enumerate(chunk):
            for t, tid in enumerate(preps[p].target_ids):
                row_idx.append(r)
                pos_idx.append(preps[p].last_pos + t)
                ids.append(tid)
                owner.append(r)
        picked = resid[torch.tensor(row_idx, device=resid.device), torch.tensor(pos_idx, device=resid.device)]
        logp = _at_least_f32(final_logits(model, picked)).log_softmax(-1)
        tok = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None])[:, 0].double().cpu()
        per_row = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, torch.tensor(owner), tok)
        for r, (s, p) in enumerate(chunk):
            out[s, p] = per_row[r].exp()
    return out


def neuron_effect(
    model,
    prompts: Sequence[str | Fact],
    target: str | None,
    neurons: Sequence[Neuron] | KnowledgeNeurons,
    factor: float | int = 0.0,
    positions: str = "last",
    n_controls: int = 1,
    seed: int = 0,
    batch_size: int = 32,
) -> NeuronEffect:
    """Relative change of p(gold target) when `neurons`' hook_post is multiplied by `factor`.

    `factor=0` suppresses (Dai et al.'s erase), `factor=2` amplifies. `positions="last"` scales
    the last prompt position only (Dai et al. scale the [MASK] position); `"all"` scales every
    position, including teacher-forced target tokens. The control scales `n_controls` draws of
    random neurons with the same count per layer (`random_neurons(..., seed=seed + d)`).
    Multi-token targets: product of teacher-forced gold token probabilities, as in
    `integrated_gradients`.
    """
    if positions not in ("last", "all"):
        raise InvalidArgumentError(f"positions must be 'last' or 'all', got {positions!r}.")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor):
        raise InvalidArgumentError(f"factor must be a finite number (0 suppresses, 2 amplifies), got {factor!r}.")
    if isinstance(n_controls, bool) or not isinstance(n_controls, int) or n_controls < 0:
        raise InvalidArgumentError(f"n_controls must be an integer >= 0, got {n_controls!r}.")
    if batch_size < 1:
        raise InvalidArgumentError("batch_size must be at least 1.")
    if target is None and isinstance(neurons, KnowledgeNeurons):
        target = neurons.target
    texts, tgt = _bag(prompts, target)
    chosen = _neuron_list(model, neurons)
    if not chosen:
        raise InvalidArgumentError("No neurons to scale; pass at least one (layer, neuron) pair.")
    controls = [random_neurons(model, chosen, seed + d) for d in range(n_controls)]
    preps = [_prepare(model, p, tgt) for p in texts]
    probs = _gold_probs(model, preps, [None, chosen, *controls], float(factor), positions, batch_size)
    return NeuronEffect(
        prompts=tuple(texts), target=tgt, neurons=tuple(chosen), factor=float(factor), positions=positions,
        p_before=probs[0], p_after=probs[1], control_neurons=tuple(tuple(c) for c in controls),
        p_control=probs[2:],
    )
