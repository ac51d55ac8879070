"""The pre-screen's price and yield: `screened_trace` against the exact trace of the same cells.

    nice -n 10 python benchmarks/bench_screened.py --model gemma-3-270m --n-facts 10

Per fact and kind (mlp, attn; ROME's window, 10 noise samples, seed 0, one thread): the exact
trace of the two columns ROME reads (last subject token, last token) and of the whole grid, and
`screened_trace` (eap-ig, k = 4, top 4 layers per column) of the same columns and of the whole grid;
seconds of each, and whether each screened column's maximum is the exact column's. Facts: the
committed AIE run's (`benchmarks/results/tracing/aie_gemma-3-270m.jsonl`, known_1000 facts Gemma
answers) from its 21st on, as `bench_attribution.py`; factworld: its training facts it answers.
Writes benchmarks/results/attribution/screened_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench_attribution import factworld_facts, gemma_facts
from common import provenance, provenance_line, results_dir, table

KINDS = ("mlp", "attn")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", choices=["factworld", "gemma-3-270m"])
    ap.add_argument("--n-facts", type=int, default=10)
    ap.add_argument("--method", default="eap-ig")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import kvmem
    from kvmem.tracing import causal_trace, noise_level
    from kvmem.tracing.screened import screened_trace

    model = kvmem.load_model(args.model)
    window = kvmem.config.trace_window(model.cfg.n_layers)
    if args.model == "factworld":
        facts = [f for f, _ in factworld_facts(model, args.n_facts)]
        noise = noise_level(model, facts)
    else:
        pairs, aie = gemma_facts(20, args.n_facts)
        facts, noise = [f for f, _ in pairs], aie["noise"]
    kw = dict(window=window, noise=noise, samples=10, seed=0)
    sk = dict(method=args.method, steps=args.steps, top=args.top)
    rows, records = [], []
    for fact in facts:
        n_pos = len(kvmem.tokenize_fact(model, fact).str_tokens)
        for kind in KINDS:
            exact_grid, t_grid = timed(lambda: causal_trace(model, fact, kind=kind, progress=False, **kw))
            cols = [exact_grid.subject.last, n_pos - 1]
            _, t_cols = timed(lambda: causal_trace(model, fact, kind=kind, positions=cols, progress=False, **kw))
            scr_cols, t_scr_cols = timed(lambda: screened_trace(model, fact, kind=kind, positions=cols, **sk, **kw))
            scr_grid, t_scr_grid = timed(lambda: screened_trace(model, fact, kind=kind, positions=None, **sk, **kw))
            exact = exact_grid.scores
            # scores are probabilities, so -1 stands below every traced cell
            def found(scr, p):
                return int(torch.nan_to_num(scr.scores[:, p], nan=-1.0).argmax()) == int(exact[:, p].argmax())

            hits = [found(scr_grid, p) for p in range(n_pos)]
            hits_cols = [found(scr_cols, p) for p in cols]
            records.append({"fact": fact.prompt, "kind": kind, "exact_grid_s": t_grid, "exact_cols_s": t_cols,
                            "screened_cols_s": t_scr_cols, "screened_grid_s": t_scr_grid,
                            "peak_found_cols": hits_cols, "peak_found_grid": sum(hits) / len(hits)})
    for kind in KINDS:
        rs = [r for r in records if r["kind"] == kind]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        found_cols = sum(sum(r["peak_found_cols"]) for r in rs) / sum(len(r["peak_found_cols"]) for r in rs)
        found_grid = statistics.mean(r["peak_found_grid"] for r in rs)
        rows.append([kind, len(rs), f"{med('exact_cols_s'):.2f}", f"{med('screened_cols_s'):.2f}",
                     f"{med('exact_cols_s') / med('screened_cols_s'):.2f}x", f"{100 * found_cols:.0f}%",
                     f"{med('exact_grid_s'):.2f}", f"{med('screened_grid_s'):.2f}",
                     f"{med('exact_grid_s') / med('screened_grid_s'):.2f}x", f"{100 * found_grid:.0f}%"])
    summary = {**provenance(__file__, argv, model.cfg.device), "model": args.model, "n_facts": len(facts),
               "window": window, "noise": float(noise), "screen": sk, "records": records}
    out = results_dir("attribution")
    stem = f"screened_{args.model}"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    lines = [provenance_line(summary), "",
             f"{len(facts)} facts, window {window}, 10 noise samples, noise {float(noise):.4g}, one thread. "
             f"Screen: {args.method} (k = {args.steps}), the top {args.top} layers of each column traced exactly. "
             "Columns: last subject token and last token; grid: every token. Seconds are medians per fact and "
             "kind (the corrupted run included in each); peak found: the screened column's maximum is the exact "
             "column's argmax (share of columns).", "",
             table(["kind", "facts", "exact, 2 columns (s)", "screened, 2 columns (s)", "speed-up",
                    "peak found (2 columns)", "exact grid (s)", "screened grid (s)", "speed-up", "peak found (grid)"],
                   rows)]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
