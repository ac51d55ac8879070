"""CounterFact scoring throughput: records one at a time against records scored together.

    nice -n 10 python benchmarks/bench_eval_throughput.py --model gemma-3-270m --n-records 64 --threads 1

`evaluate_counterfact(..., editor=False, generation=False)` (the unedited model's ES/PS/NS, the
part every edit evaluation repeats) over the same records with `record_batch` 1 (one record's
prompts per forward, the old path) and 4, 16, 64 (several records' prompts share forwards), each
`--rounds` times in alternation; the metrics must agree across settings. Records: the CounterFact
file's first `--n-records` (data folder: --data, $KVMEM_DATA) for real models, the world's own
records for factworld. Writes benchmarks/results/editing/eval_throughput_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench_editing import factworld_records
from common import add_data_arguments, data_file, provenance, provenance_line, results_dir, table

SETTINGS = (1, 4, 16, 64)
METRICS = ["ES", "EM", "PS", "PM", "NS", "NM"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="factworld")
    ap.add_argument("--n-records", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    add_data_arguments(ap, "counterfact")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import kvmem
    from kvmem.evaluation import evaluate_counterfact

    model = kvmem.load_model(args.model)
    if args.model == "factworld":
        records = factworld_records(args.n_records)
    else:
        from kvmem.data import load_counterfact

        records = load_counterfact(data_file(args, "counterfact"), limit=args.n_records)
    n_prompts = sum(1 + len(r.paraphrase_prompts) + len(r.neighborhood_prompts) for r in records)
    seconds = {s: [] for s in SETTINGS}
    frames = {}
    for _ in range(args.rounds):
        for s in SETTINGS:
            t0 = time.perf_counter()
            ev = evaluate_counterfact(model, records, editor=False, generation=False, record_batch=s, progress=False)
            seconds[s].append(time.perf_counter() - t0)
            frames[s] = ev.to_frame()[METRICS].to_numpy(dtype=float)
    diff = max(float(np.nanmax(np.abs(frames[s] - frames[1]))) for s in SETTINGS)
    rows, res = [], {}
    base = statistics.median(seconds[1])
    for s in SETTINGS:
        med = statistics.median(seconds[s])
        res[s] = {"median_s": med, "records_per_s": len(records) / med, "speedup": base / med, "all_s": seconds[s]}
        rows.append([s, f"{med:.2f}", f"{len(records) / med:.1f}", f"{base / med:.2f}x"])
    summary = {**provenance(__file__, argv, model.cfg.device), "model": args.model, "n_records": len(records),
               "n_prompts": n_prompts, "threads": args.threads, "rounds": args.rounds, "results": res,
               "max_metric_difference": diff}
    out = results_dir("editing")
    stem = f"eval_throughput_{args.model}"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    lines = [provenance_line(summary), "",
             f"{len(records)} CounterFact records ({n_prompts} prompts, each scored for the new and the true target), "
             f"unedited model, no generation, {args.threads} thread(s); median of {args.rounds} rounds, the settings "
             f"in alternation. Metrics agree across settings to {diff:.2g} (max abs difference).", "",
             table(["records per batch", "seconds", "records / s", "vs one at a time"], rows)]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
