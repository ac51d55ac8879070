"""The two TransformerLens backends side by side: wall time and memory of the same analyses on a
`HookedTransformer` (TransformerLens 3.9) and a `TransformerBridge` in compatibility mode
(TransformerLens >= 4.3).

    python benchmarks/bench_backends.py --out benchmarks/results/backends/hooked.json   # the installed backend
    python benchmarks/bench_backends.py --quick                                         # factworld, seconds
    python benchmarks/bench_backends.py --compare --tl3 .venv/bin/python --tl4 .venv-tl4/bin/python --rounds 3

One measurement (the default mode) runs on the installed TransformerLens, on one thread: loads the
model (`kvmem.load_model`, cached), then times

- a full causal trace (`kvmem.causal_trace`, kind "mlp", the default window and 10 noise samples,
  every layer x every token),
- one integrated-gradients run (`kvmem.integrated_gradients`, every layer's neurons, 20 steps),
- ROME's key statistics at the edit layer (`second_moment`, `--stats-tokens` tokens of factworld's
  training text, uncached) and one ROME edit (`compute_rome_edit`, the model's preset, with those
  statistics plus a small ridge: so few tokens leave Gemma's C singular; the cost is the same),

each with the process's peak resident memory after it, and a few of the numbers computed (the trace
grid, the top attributions, k*/v* norms) so that the driver can check both backends computed the same.
Default model Gemma-3-270m (the `[real]` extra); `--quick`: factworld, the same analyses.

Two TransformerLens versions cannot share a process, so `--compare` alternates processes instead: the
3.9 environment's run, then the 4.x one's, `--rounds` times (drift on a shared machine hits both
alike), and writes the median of each measure per backend and their ratio (bridge / hooked) to
`benchmarks/results/backends/backends_<model>.{json,md}` (`--out-dir`), keeping every round's file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mb, provenance, provenance_line, reset_peak_rss, results_dir, rss_mb, table

FACTS = {  # (prompt, subject, true target, new target)
    "gemma-3-270m": ("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Paris", "Rome"),
}
MEASURES = [  # (key, label)
    ("load_s", "load (cached)"),
    ("trace_s", "causal trace, kind mlp"),
    ("ig_s", "integrated gradients"),
    ("stats_s", "ROME key statistics"),
    ("rome_s", "ROME edit"),
]


def _fact(model_name: str):
    from kvmem import Fact

    if model_name in FACTS:
        prompt, subject, true, new = FACTS[model_name]
        return Fact(prompt, subject, target_true=true, target_new=new)
    from kvmem.factworld import counterfact_records

    return counterfact_records(n=1)[0].request  # the demo's fact (index 0)


def measure(model_name: str, stats_tokens: int, samples: int, steps: int) -> dict:
    """Time the analyses on the installed backend (this process, one thread)."""
    import torch

    torch.set_num_threads(1)
    from importlib.metadata import version

    import kvmem
    from kvmem.core.backend import backend_of
    from kvmem.editing import compute_rome_edit, second_moment
    from kvmem.editing.rome import edit_layer, rome_hparams
    from kvmem.factworld import corpus

    out: dict = {"model": model_name, "transformer_lens": version("transformer-lens"), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "python": platform.python_version()}
    kvmem.load_model(model_name)  # builds the cache if needed: not timed
    reset_peak_rss()
    t = time.perf_counter()
    model = kvmem.load_model(model_name)
    out["load_s"] = time.perf_counter() - t
    out["backend"] = backend_of(model)
    out["model_class"] = type(model).__name__
    out["rss_after_load_mb"] = rss_mb()
    out["load_peak_rss_mb"] = peak_rss_mb()
    fact = _fact(model_name)
    out["fact"] = {"prompt": fact.prompt, "subject": fact.subject, "target_true": fact.target_true,
                   "target_new": fact.target_new}
    with torch.no_grad():  # warm-up: one forward pass
        model(model.to_tokens(fact.prompt))

    reset_peak_rss()
    t = time.perf_counter()
    trace = kvmem.causal_trace(model, fact, kind="mlp", samples=samples, progress=False)
    out["trace_s"] = time.perf_counter() - t
    out["trace_peak_rss_mb"] = peak_rss_mb()
    out["trace_scores"] = trace.scores.tolist()
    out["trace_cells"] = int(trace.scores.numel())

    reset_peak_rss()
    t = time.perf_counter()
    attribution = kvmem.integrated_gradients(model, fact, steps=steps, progress=False)
    out["ig_s"] = time.perf_counter() - t
    out["ig_peak_rss_mb"] = peak_rss_mb()
    scores = attribution.scores.flatten()
    top = scores.topk(10)
    d_mlp = attribution.scores.shape[-1]
    out["ig_top"] = [[int(i) // d_mlp, int(i) % d_mlp, float(v)] for v, i in zip(top.values, top.indices)]
    out["ig_sum"] = float(scores.double().sum())

    layer = edit_layer(model, rome_hparams(model))
    reset_peak_rss()
    t = time.perf_counter()
    stats = second_moment(model, layer, corpus(), n_tokens=stats_tokens, use_cache=False, progress=False)
    out["stats_s"] = time.perf_counter() - t
    out["stats_tokens"] = stats_tokens
    # A short sample of text leaves C singular on a wide MLP (Gemma: 2048 keys); a ridge of 1e-3 of its mean
    # diagonal makes it invertible. The edit's cost does not depend on C's values.
    C = stats.C + 1e-3 * stats.C.diagonal().mean() * torch.eye(stats.C.shape[0], dtype=stats.C.dtype)
    t = time.perf_counter()
    edit = compute_rome_edit(model, fact, stats=C)
    out["rome_s"] = time.perf_counter() - t
    out["rome_peak_rss_mb"] = peak_rss_mb()  # statistics and edit
    out["rome_layer"] = layer
    out["rome_k_star_norm"] = float(edit.k_star.double().norm())
    out["rome_v_star_norm"] = float(edit.v_star.double().norm())
    out["rome_loss_final"] = [float(x) for x in edit.loss_trace[-1]] if len(edit.loss_trace) else []
    out["peak_rss_mb"] = max(out[k] for k in ("load_peak_rss_mb", "trace_peak_rss_mb", "ig_peak_rss_mb",
                                                "rome_peak_rss_mb"))
    return out


# --- the driver -------------------------------------------------------------------------------------

def _median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else float("nan")


def _max_rel(a, b) -> float:
    """Largest |a - b| / max(|b|, 1e-12) over matching entries of nested lists of numbers (NaN cells skipped)."""
    import torch

    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ok = ~(x.isnan() | y.isnan())
    if not ok.any():
        return float("nan")
    return float(((x - y).abs() / y.abs().clamp_min(1e-12))[ok].max())


def agreement(hooked: dict, bridge: dict) -> dict:
    """How far the bridge's numbers are from the HookedTransformer's (one run of each)."""
    out = {"trace_max_abs_diff": float("nan"), "trace_max_rel_diff": float("nan")}
    if len(hooked["trace_scores"]) == len(bridge["trace_scores"]):
        import torch

        a = torch.tensor(bridge["trace_scores"], dtype=torch.float64)
        b = torch.tensor(hooked["trace_scores"], dtype=torch.float64)
        ok = ~(a.isnan() | b.isnan())
        out["trace_max_abs_diff"] = float((a - b).abs()[ok].max())
        out["trace_max_rel_diff"] = _max_rel(bridge["trace_scores"], hooked["trace_scores"])
    out["ig_same_top10"] = [t[:2] for t in hooked["ig_top"]] == [t[:2] for t in bridge["ig_top"]]
    out["ig_top1_rel_diff"] = _max_rel([bridge["ig_top"][0][2]], [hooked["ig_top"][0][2]])
    out["ig_sum_rel_diff"] = _max_rel([bridge["ig_sum"]], [hooked["ig_sum"]])
    out["rome_same_layer"] = hooked["rome_layer"] == bridge["rome_layer"]
    out["rome_k_star_norm_rel_diff"] = _max_rel([bridge["rome_k_star_norm"]], [hooked["rome_k_star_norm"]])
    out["rome_v_star_norm_rel_diff"] = _max_rel([bridge["rome_v_star_norm"]], [hooked["rome_v_star_norm"]])
    return out


def run_one(python: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = [python, __file__, "--model", args.model, "--out", str(out), "--stats-tokens", str(args.stats_tokens),
           "--samples", str(args.samples), "--steps", str(args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the run with {python} failed")
    return json.loads(out.read_text())


def compare(args: argparse.Namespace, argv: list[str] | None) -> dict:
    out_dir = Path(args.out_dir)
    runs_dir = out_dir / f"runs_{args.model}"
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"hooked": [], "bridge": []}
    for r in range(args.rounds):
        for label, python in (("tl3", args.tl3), ("tl4", args.tl4)):
            row = run_one(python, runs_dir / f"{label}_round{r}.json", args)
            rows[row["backend"]].append(row)
            print(f"round {r}: {row['backend']} (transformer-lens {row['transformer_lens']}): "
                  + ", ".join(f"{k} {row[k]:.2f}" for k, _ in MEASURES), flush=True)
    if not rows["hooked"] or not rows["bridge"]:
        raise SystemExit(f"--tl3 and --tl4 must run different backends; got {[k for k, v in rows.items() if v]}")
    summary = {"model": args.model, "rounds": args.rounds, "measures": {}}
    for key, label in MEASURES + [("peak_rss_mb", "peak RSS MB")]:
        h, b = _median(rows["hooked"], key), _median(rows["bridge"], key)
        summary["measures"][key] = {"label": label, "hooked": h, "bridge": b, "ratio": b / h if h else float("nan"),
                                    "hooked_all": [x[key] for x in rows["hooked"]],
                                    "bridge_all": [x[key] for x in rows["bridge"]]}
    summary["agreement"] = agreement(rows["hooked"][0], rows["bridge"][0])
    summary["versions"] = {k: {"transformer_lens": v[0]["transformer_lens"], "torch": v[0]["torch"]}
                           for k, v in rows.items()}
    summary["trace_cells"] = rows["hooked"][0]["trace_cells"]
    summary["stats_tokens"] = args.stats_tokens
    prov = provenance(__file__, argv)
    prov["machine"] = rows["hooked"][0]["provenance"]["machine"]  # the measuring runs' (one thread), not the driver's
    result = {"meta": prov, **summary}
    (out_dir / f"backends_{args.model}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"backends_{args.model}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    m, v = result["measures"], result["versions"]
    rows = []
    for key, d in m.items():
        fmt = "{:.0f}" if key == "peak_rss_mb" else "{:.2f}"
        spread = lambda xs: ", ".join(fmt.format(x) for x in xs)  # noqa: E731
        rows.append([d["label"], fmt.format(d["hooked"]), fmt.format(d["bridge"]), f"{d['ratio']:.2f}×",
                     spread(d["hooked_all"]), spread(d["bridge_all"])])
    a = result["agreement"]
    agree = (f"Same numbers (one run of each): causal trace max |difference| {a['trace_max_abs_diff']:.2e} over "
             f"{result['trace_cells']} cells; the ten top integrated-gradients neurons "
             f"{'identical' if a['ig_same_top10'] else 'DIFFER'} (top score relative difference "
             f"{a['ig_top1_rel_diff']:.1e}, sum {a['ig_sum_rel_diff']:.1e}); ROME at layer "
             f"{'the same' if a['rome_same_layer'] else 'DIFFERENT layers'}, |k*| and |v*| relative differences "
             f"{a['rome_k_star_norm_rel_diff']:.1e} and {a['rome_v_star_norm_rel_diff']:.1e}.")
    slow = [d["label"] for k, d in m.items() if k not in ("peak_rss_mb", "load_s") and d["ratio"] > 1.2]
    goal = ("Goal (bridge within 1.2× of HookedTransformer): **met** for every analysis." if not slow else
            f"Goal (bridge within 1.2× of HookedTransformer): **not met** for {', '.join(slow)}.")
    return (
        f"# Backends: HookedTransformer vs TransformerBridge, {result['model']}\n\n"
        f"{provenance_line(result['meta'])} One thread per run; the TransformerLens {v['hooked']['transformer_lens']} "
        f"and {v['bridge']['transformer_lens']} environments' runs alternated {result['rounds']} times (one process "
        f"each: two TransformerLens versions cannot share one); medians, then every round. Seconds; the ROME key "
        f"statistics read {result['stats_tokens']} tokens of factworld's training text; peak RSS is the "
        "largest of the process's peaks in the load and each analysis (the model's weights included).\n\n"
        + table(["measure", "HookedTransformer", "TransformerBridge", "ratio", "hooked rounds", "bridge rounds"],
                rows, ["l", "r", "r", "r", "r", "r"])
        + f"\n\n{goal}\n\n{agree}\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default gemma-3-270m (--quick: factworld)")
    ap.add_argument("--quick", action="store_true", help="factworld, fewer statistics tokens: seconds per run")
    ap.add_argument("--samples", type=int, default=10, help="causal-trace noise samples (default 10)")
    ap.add_argument("--steps", type=int, default=20, help="integrated-gradients steps (default 20)")
    ap.add_argument("--stats-tokens", type=int, default=None,
                    help="tokens for ROME's key statistics (default 8192; --quick 2048)")
    ap.add_argument("--out", default=None,
                    help="one run's JSON (default benchmarks/results/backends/<backend>[_<model>].json)")
    ap.add_argument("--compare", action="store_true", help="alternate the two environments' runs (--tl3, --tl4)")
    ap.add_argument("--tl3", default=None, help="python of the TransformerLens 3.9 environment")
    ap.add_argument("--tl4", default=None, help="python of the TransformerLens >= 4.3 environment")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out-dir", default=str(results_dir("backends")))
    args = ap.parse_args(argv)
    args.model = args.model or ("factworld" if args.quick else "gemma-3-270m")
    args.stats_tokens = args.stats_tokens or (2048 if args.quick else 8192)
    if args.compare:
        if not (args.tl3 and args.tl4):
            ap.error("--compare needs --tl3 PYTHON and --tl4 PYTHON")
        compare(args, argv)
        return
    row = measure(args.model, args.stats_tokens, args.samples, args.steps)
    row["provenance"] = provenance(__file__, argv)
    out = Path(args.out) if args.out else results_dir("backends") / (
        row["backend"] + ("" if args.model == "gemma-3-270m" else f"_{args.model}") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print(json.dumps({k: v for k, v in row.items() if not k.startswith(("trace_scores", "ig_top"))}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
