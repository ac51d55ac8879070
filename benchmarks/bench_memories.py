"""Key-value memories (Geva et al. 2021) on a real corpus: agreement, refinement, key examples,
and the cost of streaming top contexts.

    python benchmarks/bench_memories.py --model gemma-3-270m --tokens 200000
    python benchmarks/bench_memories.py --model factworld --tokens 5000 --stem memories_factworld

Writes benchmarks/results/memories/<stem>.json, <stem>.md and two figures (<stem>_agreement.png,
<stem>_composition.png). The corpus defaults to the data folder's Wikipedia summaries (--data,
$KVMEM_DATA, or ../shared/data beside the repository). What is measured:

- throughput: top-context streaming over all layers (tokenization included) vs a plain forward
  over the same pre-tokenized windows, both the full forward (logits) and one stopped at the
  same depth (no unembedding); goal >= 70% of the plain forward;
- memory: the exact size of the running top-k state (independent of corpus size by
  construction) and the process's peak RSS after a short and after the full run;
- value projections of every layer, key-value agreement by layer vs shuffled and uniform
  baselines, composition/refinement on sampled positions, and example keys per layer band.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from common import add_data_arguments, data_file, peak_rss_mb, provenance, provenance_line, results_dir


def chain_corpora(paths: list[str]) -> Iterator[str]:
    from kvmem.data import read_corpus

    for p in paths:
        yield from read_corpus(p)


def _short(text: str, n: int = 90) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else "…" + text[-(n - 1):]


def key_examples(tcs: dict, vts: dict, n_layers: int, per_band: int = 2, show: int = 4, seed: int = 0) -> list[dict]:
    """Per layer band, the keys whose top-10 triggers share a trigger token most ("shallow"),
    those whose triggers share a next token most ("next-token"), and one random key."""
    import torch

    bands = {
        "lower": range(0, max(1, n_layers // 3)),
        "middle": range(max(1, n_layers // 3), max(2, 2 * n_layers // 3)),
        "upper": range(max(2, 2 * n_layers // 3), n_layers),
    }
    gen = torch.Generator().manual_seed(seed)
    out = []
    for band, layers in bands.items():
        layers = [l for l in layers if l in tcs]
        if not layers:
            continue
        cands = {"same trigger token": [], "same next token": []}
        for l in layers:
            tc = tcs[l]
            top = min(10, tc.k)
            for crit, ids in (("same trigger token", tc.trigger_ids[:, :top]), ("same next token", tc.next_tokens[:, :top])):
                ok = torch.isfinite(tc.coefficients[:, :top])
                mode = ids.mode(dim=1).values
                share = ((ids == mode[:, None]) & ok & (ids >= 0)).sum(1).float() / top
                for j in share.topk(min(per_band * 3, len(share))).indices.tolist():
                    cands[crit].append((float(share[j]), l, int(tc.neurons[j])))
        picks = []
        for crit, lst in cands.items():
            lst.sort(key=lambda t: -t[0])
            seen_layers = set()
            for share, l, nrn in lst:  # prefer different layers within a band
                if len([p for p in picks if p[0] == crit]) >= per_band:
                    break
                if l in seen_layers and len(set(x[1] for x in lst)) > 1:
                    continue
                seen_layers.add(l)
                picks.append((crit, l, nrn, share))
        l = layers[int(torch.randint(len(layers), (1,), generator=gen))]
        nrn = int(tcs[l].neurons[int(torch.randint(len(tcs[l].neurons), (1,), generator=gen))])
        picks.append(("random key", l, nrn, float("nan")))
        for crit, l, nrn, share in picks:
            tc, vt = tcs[l], vts[l]
            out.append(
                {
                    "band": band,
                    "selected_by": crit,
                    "share_of_top10": share,
                    "layer": l,
                    "neuron": nrn,
                    "value_top_tokens": vt.tokens(nrn, "top")[:6],
                    "contexts": [
                        {"context": _short(e["context"]), "trigger": e["trigger"], "next": e["next"], "coefficient": round(e["coefficient"], 3)}
                        for e in tc.examples(nrn, show)
                    ],
                }
            )
    return out


def run(
    model,
    model_name: str,
    corpus: str | Path | Iterable[str] | list[str],
    corpus_name: str,
    tokens: int = 200_000,
    composition_tokens: int = 16_000,
    throughput_tokens: int = 4_096,
    out_dir: Path = results_dir("memories"),
    stem: str = "memories",
    k: int = 25,
    window: int = 64,
    batch_size: int = 8,
    context: int = 24,
    positions_per_window: int = 2,
    k_values: int = 10,
    seed: int = 0,
    progress: bool = True,
    prov: dict | None = None,
) -> dict:
    """Measure and write `<out_dir>/<stem>.*`; `prov`: the provenance (common.provenance) to record."""
    import torch

    from kvmem.memories import (
        composition_stats,
        corpus_windows,
        key_value_agreement,
        top_contexts_by_layer,
        value_tokens,
    )
    from kvmem.memories.contexts import RunningTopK

    docs = list(corpus) if not isinstance(corpus, (str, Path)) else [corpus]
    is_files = all(isinstance(c, Path) or (len(c) < 4096 and "\n" not in c and Path(c).is_file()) for c in docs)
    make_corpus = (lambda: chain_corpora([str(c) for c in docs])) if is_files else (lambda: docs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    res: dict = {
        **({"provenance": prov} if prov else {}),
        "model": model_name,
        "corpus": corpus_name,
        "config": dict(tokens=tokens, composition_tokens=composition_tokens, throughput_tokens=throughput_tokens, k=k,
                       window=window, batch_size=batch_size, context=context, positions_per_window=positions_per_window,
                       k_values=k_values, seed=seed, final_norm="linear"),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), "device": str(model.cfg.device)},
        "model_shape": {"n_layers": n_layers, "d_mlp": d_mlp, "d_model": model.cfg.d_model, "d_vocab": model.cfg.d_vocab},
    }
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)

    # 1. Throughput on a short prefix: plain forwards over pre-tokenized windows vs streaming.
    tp_tokens = min(throughput_tokens, tokens)
    batches = list(corpus_windows(model, make_corpus(), window=window, batch_size=batch_size, max_tokens=tp_tokens))
    n_tp = sum(b.n_tokens for b in batches)
    device = model.W_U.device
    with torch.no_grad():
        model(batches[0].tokens.to(device), stop_at_layer=n_layers)  # warm-up
        t = time.perf_counter()
        for b in batches:
            model(b.tokens.to(device))
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        for b in batches:
            model(b.tokens.to(device), stop_at_layer=n_layers)
        body_s = time.perf_counter() - t
    t = time.perf_counter()
    top_contexts_by_layer(model, make_corpus(), k=k, window=window, batch_size=batch_size, max_tokens=tp_tokens,
                          context=context, progress=False)
    short_s = time.perf_counter() - t
    rss_short = peak_rss_mb()
    log(f"throughput: full {n_tp / full_s:.0f} tok/s, body {n_tp / body_s:.0f} tok/s, streaming {n_tp / short_s:.0f} tok/s")

    # 2. The full streaming run, all layers at once.
    t = time.perf_counter()
    tcs = top_contexts_by_layer(model, make_corpus(), k=k, window=window, batch_size=batch_size, max_tokens=tokens,
                                context=context, progress=progress)
    stream_s = time.perf_counter() - t
    n_streamed = next(iter(tcs.values())).n_tokens
    rss_full = peak_rss_mb()
    state_bytes = n_layers * RunningTopK(d_mlp, k, context, "meta").nbytes()
    res["throughput"] = {
        "tokens_measured": n_tp,
        "plain_forward_full_tok_s": n_tp / full_s,
        "plain_forward_no_unembed_tok_s": n_tp / body_s,
        "streaming_tok_s_short": n_tp / short_s,
        "streaming_tok_s_full_run": n_streamed / stream_s,
        "ratio_vs_full_forward": (n_tp / short_s) / (n_tp / full_s),
        "ratio_vs_same_depth": (n_tp / short_s) / (n_tp / body_s),
        "ratio_full_run_vs_same_depth": (n_streamed / stream_s) / (n_tp / body_s),
    }
    res["memory"] = {
        "topk_state_mb": state_bytes / 2**20,
        "peak_rss_mb_after_short_run": rss_short,
        "peak_rss_mb_after_full_run": rss_full,
        "short_run_tokens": n_tp,
        "full_run_tokens": n_streamed,
    }
    res["tokens_streamed"] = n_streamed
    res["streaming_seconds"] = stream_s

    # 3. Values of every layer.
    t = time.perf_counter()
    vts = {l: value_tokens(model, l, k=k_values, progress=False) for l in range(n_layers)}
    res["value_projection_seconds"] = time.perf_counter() - t
    log(f"values: {res['value_projection_seconds']:.1f} s")

    # 4. Agreement.
    ag = key_value_agreement(model, tcs, vts, k_values=k_values, seed=seed)
    res["agreement"] = ag.to_frame().to_dict(orient="records")
    res["agreement_uniform_baseline"] = ag.uniform

    # 5. Composition and refinement on sampled positions.
    t = time.perf_counter()
    comp = composition_stats(model, make_corpus(), max_tokens=composition_tokens,
                             positions_per_window=positions_per_window, window=window, batch_size=batch_size,
                             values=vts, seed=seed, progress=progress)
    res["composition_seconds"] = time.perf_counter() - t
    res["composition_positions"] = comp.n_positions
    res["composition"] = comp.to_frame().to_dict(orient="records")

    # 6. Example keys.
    res["key_examples"] = key_examples(tcs, vts, n_layers, seed=seed)

    # Figures and files.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = ag.plot()
    fig.savefig(out_dir / f"{stem}_agreement.png", dpi=110)
    plt.close(fig)
    fig = comp.plot()
    fig.savefig(out_dir / f"{stem}_composition.png", dpi=110)
    plt.close(fig)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float))
    (out_dir / f"{stem}.md").write_text(to_markdown(res, stem))
    return res


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def to_markdown(res: dict, stem: str) -> str:
    tp, mem, cfg = res["throughput"], res["memory"], res["config"]
    s = res["model_shape"]
    lines = [
        f"# Key-value memories: {res['model']} on {res['corpus']}",
        "",
        f"{res['tokens_streamed']:,} tokens streamed (windows of {cfg['window']}, batches of {cfg['batch_size']}), "
        f"top-{cfg['k']} contexts for all {s['n_layers']} x {s['d_mlp']} keys; values read through the final "
        f"norm's linear part (`final_norm=\"linear\"`); torch threads: {res['machine']['torch_threads']}, "
        f"device: {res['machine']['device']}."
        + (f" {provenance_line(res['provenance'])}" if res.get("provenance") else ""),
        "",
        "## Streaming cost",
        "",
        "| | tokens/s |",
        "|---|---|",
        f"| plain forward, full (logits) | {tp['plain_forward_full_tok_s']:.0f} |",
        f"| plain forward, all layers, no unembedding | {tp['plain_forward_no_unembed_tok_s']:.0f} |",
        f"| top-context streaming, all layers ({tp['tokens_measured']:,} tokens, tokenization included) | {tp['streaming_tok_s_short']:.0f} |",
        f"| top-context streaming, full run ({res['tokens_streamed']:,} tokens) | {tp['streaming_tok_s_full_run']:.0f} |",
        "",
        f"Streaming / plain full forward: **{tp['ratio_vs_full_forward']:.0%}**; streaming / plain forward of the same "
        f"depth: **{tp['ratio_vs_same_depth']:.0%}** (full run: {tp['ratio_full_run_vs_same_depth']:.0%}; goal >= 70%).",
        "",
        f"Memory: the running top-k state is {mem['topk_state_mb']:.1f} MB for every corpus size (neurons x k x "
        f"{cfg['context']} context tokens per layer); peak RSS {mem['peak_rss_mb_after_short_run']:.0f} MB after "
        f"{mem['short_run_tokens']:,} tokens, {mem['peak_rss_mb_after_full_run']:.0f} MB after {mem['full_run_tokens']:,}.",
        "",
        f"Value projections of all layers: {res['value_projection_seconds']:.1f} s; composition on "
        f"{res['composition_positions']} positions: {res['composition_seconds']:.1f} s.",
        "",
        "## Key-value agreement",
        "",
        f"Fraction of memories whose value's top token is the next token of the key's top-1 trigger "
        f"(Geva et al.); uniform baseline 1/|V| = {_pct(res['agreement_uniform_baseline'])}; shuffled = values "
        f"paired with random keys of the same layer (20 shuffles). Figure: `{stem}_agreement.png`.",
        "",
        f"| layer | agreement | shuffled | next token in value top-{cfg['k_values']} | shuffled | all top-k triggers |",
        "|---|---|---|---|---|---|",
    ]
    kv = cfg["k_values"]
    for r in res["agreement"]:
        lines.append(
            f"| {r['layer']} | {_pct(r['agreement'])} | {_pct(r['shuffled'])} | {_pct(r[f'in_value_top{kv}'])} | "
            f"{_pct(r[f'shuffled_in_top{kv}'])} | {_pct(r['agreement_all_triggers'])} |"
        )
    lines += [
        "",
        "## Composition and refinement",
        "",
        f"{res['composition_positions']} sampled positions. Active = fewest memories carrying 90% of the layer's "
        "|coefficient| x |value|; compositional = the MLP output's top token is none of the active memories' top "
        "tokens; refinement uses the logit lens (final norm + unembedding) on the residual before and after each MLP. "
        f"Figure: `{stem}_composition.png`.",
        "",
        "| layer | coef > 0 | active (90%) | compositional | before = final | after = final | MLP keeps | overrides | composes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["composition"]:
        act = [k for k in r if k.startswith("n_active")][0]
        lines.append(
            f"| {r['layer']} | {r['n_positive']:.0f} | {r[act]:.0f} | {_pct(r['compositional'])} | "
            f"{_pct(r['residual_before_matches_final'])} | {_pct(r['residual_after_matches_final'])} | "
            f"{_pct(r['mlp_keeps_residual_top'])} | {_pct(r['mlp_overrides'])} | {_pct(r['mlp_composes'])} |"
        )
    lines += ["", "## Example keys by layer band", "",
              "Selected automatically: the keys whose top-10 triggers most often share the trigger token or the next "
              "token, and one random key per band.", ""]
    for e in res["key_examples"]:
        share = "" if e["share_of_top10"] != e["share_of_top10"] else f", {e['share_of_top10']:.0%} of top-10"
        lines.append(f"**{e['band']} — L{e['layer']}.N{e['neuron']}** ({e['selected_by']}{share}); value promotes "
                     + " ".join(f"`{t!r}`" for t in e["value_top_tokens"]))
        lines.append("")
        for c in e["contexts"]:
            ctx = c["context"].replace("|", "\\|")
            lines.append(f"- {ctx} **[{c['trigger']}]** → `{c['next']!r}` ({c['coefficient']})")
        lines.append("")
    return "\n".join(lines) + "\n"


def replot_agreement(out_dir: Path, stem: str) -> None:
    """The agreement figure from a finished run's JSON (figure fixes without recomputing)."""
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from kvmem.memories.agreement import Agreement

    res = json.loads((out_dir / f"{stem}.json").read_text())
    rows = res["agreement"]
    col = lambda name: torch.tensor([r[name] for r in rows])  # noqa: E731
    k = next(int(c[len("in_value_top"):]) for c in rows[0] if c.startswith("in_value_top"))
    ag = Agreement(
        layers=tuple(r["layer"] for r in rows), agreement=col("agreement"), agreement_all=col("agreement_all_triggers"),
        in_value_topk=col(f"in_value_top{k}"), shuffled=col("shuffled"), shuffled_in_topk=col(f"shuffled_in_top{k}"),
        uniform=float(res["agreement_uniform_baseline"]), n_memories=torch.tensor([r["n_memories"] for r in rows]),
        k_values=k, n_tokens=int(res["tokens_streamed"]),
    )
    ag.plot().savefig(out_dir / f"{stem}_agreement.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    add_data_arguments(ap)
    ap.add_argument("--corpus", nargs="+", default=None, help="text files (default: DATA/corpus/wiki_vital_en.txt)")
    ap.add_argument("--tokens", type=int, default=200_000, help="tokens to stream for top contexts")
    ap.add_argument("--composition-tokens", type=int, default=16_000)
    ap.add_argument("--throughput-tokens", type=int, default=4_096)
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=24, help="context tokens kept per trigger")
    ap.add_argument("--positions-per-window", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="kvmem model cache (default: $KVMEM_CACHE or ~/.cache/kvmem)")
    ap.add_argument("--stem", default="memories")
    ap.add_argument("--out-dir", default=str(results_dir("memories")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--replot", action="store_true", help="redraw <stem>_agreement.png from <stem>.json; no model run")
    a = ap.parse_args(argv)
    if a.replot:
        replot_agreement(Path(a.out_dir), a.stem)
        return

    import torch

    from kvmem.models import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    t = time.perf_counter()
    model = load_model(a.model, cache_dir=a.cache_dir)
    load_s = time.perf_counter() - t
    corpora = list(a.corpus) if a.corpus else [data_file(a, "corpus")]
    res = run(
        model, a.model, corpora, " + ".join(Path(c).name for c in corpora), a.tokens, a.composition_tokens,
        a.throughput_tokens, Path(a.out_dir), a.stem, a.k, a.window, a.batch_size, a.context, a.positions_per_window,
        seed=a.seed, progress=not a.no_progress, prov=provenance(__file__, argv),
    )
    print(json.dumps({"load_s": load_s, "throughput": res["throughput"], "memory": res["memory"]}, indent=1))


if __name__ == "__main__":
    main()
