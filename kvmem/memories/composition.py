"""Composition and refinement over corpus positions (Geva et al. 2021, section 6).

At sampled corpus positions and for each layer l:

- how many memories are active: `n_positive` counts coefficients > 0 (Geva et al.'s "non-zero"
  for ReLU); because GELU/SiLU/gated keys are almost never exactly zero, `n_active` also counts
  the fewest memories whose |coefficient| x |value| (read through the final norm's linear part)
  make up `mass` (default 90%) of the layer's total;
- compositional output: the MLP output's top token (the sum of coefficient x value, without
  `b_out`, read like a value; through the post-MLP norm's gain where there is one) equals none of the top tokens of the active memories (each memory's
  value's top token, its bottom token where the coefficient is negative);
- refinement: the residual's top prediction (logit lens: final norm with its scale, `W_U`,
  `b_U`, soft-cap) before the MLP (`resid_mid`), after it (`resid_post`) and the model's final
  prediction; when the MLP changes the residual's top token, whether the new one is the MLP
  output's own top token ("override") or neither ("compose").

Unembedding every position at every layer is the costliest part (Gemma: 262k tokens), so this
runs on `positions_per_window` random text positions of each window (seeded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kvmem.core.backend import run_to_layer
from kvmem import config
from kvmem.core.hooks import capture
from kvmem.core.readout import final_logits
from kvmem.core.weights import check_layers, hook_post_name
from kvmem.errors import InvalidArgumentError
from kvmem.memories._common import check_final_norm, check_k, readout_directions, readout_logits, value_directions
from kvmem.memories.values import ValueTokens, value_tokens
from kvmem.memories.windows import Corpus, corpus_windows


@dataclass(frozen=True)
class Composition:
    """Per-layer averages over `n_positions` sampled corpus positions (see the module docstring).

    Fractions are over positions; `n_active_per_position` keeps every position's count.
    """

    layers: tuple[int, ...]
    n_positions: int
    d_mlp: int
    mass: float
    n_positive: Float[Tensor, "layer"] = field(repr=False)
    n_active: Float[Tensor, "layer"] = field(repr=False)
    compositional: Float[Tensor, "layer"] = field(repr=False)
    mid_matches_final: Float[Tensor, "layer"] = field(repr=False)
    post_matches_final: Float[Tensor, "layer"] = field(repr=False)
    kept: Float[Tensor, "layer"] = field(repr=False)  # resid_post top == resid_mid top
    override: Float[Tensor, "layer"] = field(repr=False)  # changed, and == the MLP output's top token
    compose: Float[Tensor, "layer"] = field(repr=False)  # changed, and == neither
    n_active_per_position: Int[Tensor, "position layer"] = field(repr=False)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": list(self.layers),
                "n_positive": self.n_positive.tolist(),
                f"n_active_{int(self.mass * 100)}pct": self.n_active.tolist(),
                "compositional": self.compositional.tolist(),
                "residual_before_matches_final": self.mid_matches_final.tolist(),
                "residual_after_matches_final": self.post_matches_final.tolist(),
                "mlp_keeps_residual_top": self.kept.tolist(),
                "mlp_overrides": self.override.tolist(),
                "mlp_composes": self.compose.tolist(),
            }
        )

    def plot(self, ax=None, *, title: str | None = None):
        """Refinement (left) and composition (right); `ax`: two Axes."""
        from kvmem.memories.views import plot_composition

        return plot_composition(self, ax, title=title)


@torch.no_grad()
def composition_stats(
    model,
    corpus: Corpus,
    layers: Sequence[int] | int | None = None,
    *,
    max_tokens: int | None = 20_000,
    positions_per_window: int = 2,
    window: int = 64,
    batch_size: int = 8,
    mass: float = 0.9,
    values: Mapping[int, ValueTokens] | None = None,
    final_norm: str = "linear",
    seed: int = 0,
    progress: bool | None = None,
) -> Composition:
    """Active memories, compositional outputs and residual refinement by layer (module docstring).
    `progress`: None means `kvmem.config.PROGRESS`."""
    layers = check_layers(model, layers)
    check_k(positions_per_window, "positions_per_window")
    check_final_norm(final_norm)
    if not 0.0 < float(mass) <= 1.0:
        raise InvalidArgumentError(f"mass must be in (0, 1], got {mass}.")
    gen = torch.Generator().manual_seed(seed)
    n_layers = model.cfg.n_layers
    device = model.W_U.device
    # Static per-memory facts: top/bottom token of each value and the size of its readout.
    mem_top, mem_bot, vnorm, W_outs, b_outs = {}, {}, {}, {}, {}
    for l in layers:
        vt = (values or {}).get(l)
        if vt is None or len(vt.neurons) != model.cfg.d_mlp:
            vt = value_tokens(model, l, k=1, final_norm=final_norm, progress=False)
        mem_top[l] = vt.top_ids[:, 0].to(device)
        mem_bot[l] = vt.bottom_ids[:, 0].to(device)
        W = value_directions(model, l)
        W_outs[l] = W
        vnorm[l] = readout_directions(model, W, final_norm).float().norm(dim=-1)
    names = {l: (hook_post_name(model, l), f"blocks.{l}.hook_resid_mid", f"blocks.{l}.hook_resid_post") for l in layers}
    last_post = f"blocks.{n_layers - 1}.hook_resid_post"
    wanted = {n for trio in names.values() for n in trio} | {last_post}
    store: dict[str, Tensor] = {}
    hooks = [(n, capture(store, n)) for n in sorted(wanted)]
    stats = {k: [] for k in ("npos", "nact", "comp", "midf", "postf", "kept", "over", "compose")}
    show_bar = config.show_progress(progress)
    bar = tqdm(total=max_tokens, disable=not show_bar, desc="composition", unit="tok")
    try:
        for batch in corpus_windows(model, corpus, window=window, batch_size=batch_size, max_tokens=max_tokens):
            # Sample positions among text tokens of each window.
            rows, cols = [], []
            for b in range(batch.tokens.shape[0]):
                cand = batch.valid[b].nonzero()[:, 0]
                if len(cand) == 0:
                    continue
                pick = cand[torch.randperm(len(cand), generator=gen)[:positions_per_window]]
                rows += [b] * len(pick)
                cols += pick.tolist()
            bar.update(batch.n_tokens)
            if not rows:
                continue
            r = torch.tensor(rows, device=device)
            c = torch.tensor(cols, device=device)
            with model.hooks(fwd_hooks=hooks):
                run_to_layer(model, batch.tokens.to(device), n_layers)
            final_top = final_logits(model, store[last_post][r, c]).argmax(-1)
            per_layer = {k: [] for k in stats}
            for l in layers:
                post_n, mid_n, rpost_n = names[l]
                coef = store[post_n][r, c].float()  # (P, d_mlp)
                contrib = coef.abs() * vnorm[l][None, :]
                order = contrib.argsort(dim=-1, descending=True)
                cum = contrib.gather(1, order).cumsum(-1)
                total = cum[:, -1:]
                n_act = (cum < mass * total).sum(-1) + 1
                n_act = torch.minimum(n_act, torch.full_like(n_act, coef.shape[1]))
                mem_tok = torch.where(coef > 0, mem_top[l][None, :], mem_bot[l][None, :]).gather(1, order)
                ranks = torch.arange(coef.shape[1], device=device)[None, :]
                mlp_out = coef.to(W_outs[l].dtype) @ W_outs[l]
                mlp_top = readout_logits(model, mlp_out, final_norm).argmax(-1)
                covered = ((mem_tok == mlp_top[:, None]) & (ranks < n_act[:, None])).any(-1)
                mid_top = final_logits(model, store[mid_n][r, c]).argmax(-1)
                post_top = final_logits(model, store[rpost_n][r, c]).argmax(-1)
                changed = post_top != mid_top
                per_layer["npos"].append((coef > 0).sum(-1).float())
                per_layer["nact"].append(n_act.float())
                per_layer["comp"].append((~covered).float())
                per_layer["midf"].append((mid_top == final_top).float())
                per_layer["postf"].append((post_top == final_top).float())
                per_layer["kept"].append((~changed).float())
                per_layer["over"].append((changed & (post_top == mlp_top)).float())
                per_layer["compose"].append((changed & (post_top != mlp_top)).float())
            for k in stats:
                stats[k].append(torch.stack(per_layer[k], dim=1).cpu())  # (P, layer)
            store.clear()
    finally:
        bar.close()
    if not stats["npos"]:
        raise InvalidArgumentError("No corpus position to analyse; pass a corpus with some text in it.")
    cat = {k: torch.cat(v) for k, v in stats.items()}
    mean = lambda k: cat[k].double().mean(0)  # noqa: E731
    return Composition(
        layers=tuple(layers),
        n_positions=int(cat["npos"].shape[0]),
        d_mlp=int(model.cfg.d_mlp),
        mass=float(mass),
        n_positive=mean("npos"),
        n_active=mean("nact"),
        compositional=mean("comp"),
        mid_matches_final=mean("midf"),
        post_matches_final=mean("postf"),
        kept=mean("kept"),
        override=mean("over"),
        compose=mean("compose"),
        n_active_per_position=cat["nact"].long(),
    )
