"""ROME's key statistics C: collection throughput against a plain forward over the same tokens,
measured back to back in one process (goal: C at ≥ 80% of a plain forward).

    python benchmarks/bench_stats_throughput.py --models factworld gemma-3-270m --tokens 20000 --repeats 3

Per model: C at the preset's edit layer recomputed from scratch (a fresh cache folder, so nothing
is loaded), and a plain no-grad forward stopped after the same layer (no hooks, no unembedding,
the same token rows), alternated `--repeats` times; medians and their ratio go to
benchmarks/results/editing/stats_throughput.md/.json. Text: factworld's own (`kvmem.factworld.corpus()`),
else --corpus (default: the data folder's Wikipedia summaries; --data, $KVMEM_DATA, or ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import add_data_arguments, data_file, provenance, provenance_line, results_dir


def measure(name: str, args) -> dict:
    import torch

    from bench_editing import load, plain_forward_tok_s
    from kvmem.editing import rome_hparams, second_moment
    from kvmem.editing.rome import edit_layer
    from kvmem.factworld import corpus as factworld_corpus

    model = load(name, None)
    layer = edit_layer(model, rome_hparams(model), None) if name != "factworld" else 0
    corpus = factworld_corpus() if name == "factworld" else data_file(args, "corpus")
    plain_forward_tok_s(model, corpus, min(args.tokens, 2000), layer)  # warm-up
    stats, plain = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            sm = second_moment(model, layer, corpus, n_tokens=args.tokens, cache_dir=cache, progress=False)
            stats.append(sm.n_tokens / (time.perf_counter() - t))
        plain.append(plain_forward_tok_s(model, corpus, args.tokens, layer))
    s, p = statistics.median(stats), statistics.median(plain)
    return {"model": name, "layer": layer, "tokens": args.tokens, "stats_tok_s": stats, "plain_tok_s": plain,
            "stats_median": s, "plain_median": p, "ratio": s / p, "threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["factworld", "gemma-3-270m"])
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    add_data_arguments(ap, "corpus")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(results_dir("editing") / "stats_throughput"))
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(m, args) for m in args.models]
    prov = provenance(__file__, argv)
    argv = sys.argv[1:] if argv is None else argv
    lines = ["# C statistics throughput vs a plain forward", "",
             f"{provenance_line(prov)} C and the plain forward alternated, medians.", "",
             "| model | edit layer | tokens | C tok/s | plain forward to the layer tok/s | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['tokens']} | {r['stats_median']:.0f} | {r['plain_median']:.0f} | "
                     f"{r['ratio']:.0%} |")
    lines += ["", "Goal: C at ≥ 80% of the plain forward.", ""]
    Path(f"{args.out}.md").write_text("\n".join(lines))
    Path(f"{args.out}.json").write_text(json.dumps({**prov, "argv": argv, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
