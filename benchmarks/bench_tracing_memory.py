"""Does the causal-tracing engine stay within its memory budget? Peak memory of a full trace per budget.

    python benchmarks/bench_tracing_memory.py --model gemma-3-270m --budgets 16 64 256 1024

Each budget runs in a fresh process: load the model, run a one-sample trace (so lazy imports and
the allocator are warm; at the smallest budget), reset the peak, read the resident memory, then run `trace_all` (3 kinds, window 10, 10
samples) with `memory_budget` = the budget, and read the process's peak resident memory (VmHWM).
The peak minus the warm baseline is the engine's working memory: the recorded clean and corrupted
runs (a fixed cost: every layer's residual, keys and values for all samples) plus the chunk of rows
in flight, which is what the budget bounds. The scores must agree for every budget to float precision
(chunking changes only the batch shapes). Writes benchmarks/results/tracing/tracing_memory_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mb, provenance, provenance_line, reset_peak_rss, results_dir, rss_mb


def child(model_name: str, budget_mb: float, samples: int, window: int, threads: int, warm_mb: float) -> dict:
    import torch

    torch.set_num_threads(threads)
    from bench_tracing import load, pick_fact

    from kvmem.core.engine import rows_for_budget
    from kvmem.core.facts import tokenize_fact
    from kvmem.tracing import noise_level, trace_all

    model = load(model_name)
    for p in model.parameters():
        p.requires_grad_(False)
    fact = pick_fact(model_name, model)
    tf = tokenize_fact(model, fact)
    budget = int(budget_mb * 2**20)
    noise = noise_level(model, [fact])
    # warm-up at the smallest budget: lazy imports and the allocator's first pools are not the engine's
    trace_all(model, fact, window=min(window, model.cfg.n_layers), samples=1, noise=noise,
              memory_budget=int(warm_mb * 2**20))
    reset = reset_peak_rss()
    base, base_peak = rss_mb(), peak_rss_mb()
    t = time.perf_counter()
    traces = trace_all(model, fact, window=min(window, model.cfg.n_layers), samples=samples,
                       noise=noise, memory_budget=budget)
    seconds = time.perf_counter() - t
    return {"budget_mb": budget_mb, "baseline_rss_mb": base, "peak_reset": reset, "peak_before_mb": base_peak,
            "peak_rss_mb": peak_rss_mb(), "seconds": seconds, "tokens": tf.n_tokens,
            "rows_per_full_chunk": rows_for_budget(model, tf.n_tokens, budget),
            "scores": {t.kind: t.scores.tolist() for t in traces}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="factworld", choices=["factworld", "gemma-3-270m", "tiny"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[16, 64, 256, 1024], help="MB")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(results_dir("tracing")))
    ap.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--warm", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.model, args.child, args.samples, args.window, args.threads, args.warm)))
        return {}

    runs = []
    for b in args.budgets:
        cmd = [sys.executable, __file__, "--model", args.model, "--samples", str(args.samples), "--window",
               str(args.window), "--threads", str(args.threads), "--child", str(b), "--warm", str(min(args.budgets))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"budget {b:g} MB: working memory {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} MB, "
              f"{r['seconds']:.1f} s", flush=True)
    import torch

    ref = {k: torch.tensor(v) for k, v in runs[-1]["scores"].items()}
    max_diff = max(float((torch.tensor(r["scores"][k]) - ref[k]).abs().max()) for r in runs for k in ref)
    prov = provenance(__file__, argv)
    lines = [f"# Causal-tracing memory by budget: {args.model}", "",
             f"{provenance_line(prov)} {args.threads} thread(s) in each measuring process; one fresh process per "
             f"budget; full `trace_all` of one fact "
             f"({runs[0]['tokens']} tokens, 3 kinds, {args.samples} samples).", "",
             "| budget MB | rows per chunk | working memory MB (peak - warm baseline) | seconds |",
             "|---:|---:|---:|---:|"]
    if not all(r["peak_reset"] for r in runs):
        lines.insert(-3, "(The peak could not be reset here: the first column includes the warm-up's peak.)")
    for r in runs:
        lines.append(f"| {r['budget_mb']:g} | {r['rows_per_full_chunk']} | "
                     f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {r['seconds']:.1f} |")
    lines += ["", f"Largest difference of any score between budgets: {max_diff:.1e} (chunking changes only "
              "the batch shapes, hence the float summation order).", ""]
    result = {**prov, "model": args.model, "runs": [{k: v for k, v in r.items() if k != "scores"}
                                                                 for r in runs], "max_score_diff_between_budgets": max_diff}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"tracing_memory_{args.model}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"tracing_memory_{args.model}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
