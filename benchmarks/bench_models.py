"""Baseline: load time (cold, cached), memory, forward throughput and fact recall per model.

    python benchmarks/bench_models.py                       # factworld and gemma-3-270m
    python benchmarks/bench_models.py --models factworld --known-limit 200

Each model is measured in its own subprocess so resident memory is its own. Cold loads use an
empty cache folder; cached loads reuse it. Fact recall on known_1000 when it is in the data folder
(--known, --data, $KVMEM_DATA, or ../shared/data beside the repository). Results go to
benchmarks/results/models/models.json and .md (--out-dir).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_data_arguments, data_file, peak_rss_mb, provenance, results_dir, rss_mb, table


def measure(name: str, cache: str, known: str | None, known_limit: int | None, batch_sizes: list[int]) -> dict:
    """Load, throughput and recall of one model (run in a process of its own); `known`: the
    known_1000 file, or None to skip that recall."""

    import torch

    import kvmem
    from kvmem.data import load_known_facts
    from kvmem.recall import fact_recall

    torch.manual_seed(0)
    out: dict = {"model": name, "threads": torch.get_num_threads()}
    t = time.perf_counter()
    model = kvmem.load_model(name, cache_dir=cache)
    out["load_cold_s"] = time.perf_counter() - t
    del model
    t = time.perf_counter()
    model = kvmem.load_model(name, cache_dir=cache)
    out["load_cached_s"] = time.perf_counter() - t
    out["rss_after_load_mb"] = rss_mb()
    out["n_params_m"] = sum(p.numel() for p in model.parameters()) / 1e6

    seq = 16
    with torch.no_grad():
        for bs in batch_sizes:
            tokens = torch.randint(1, min(model.cfg.d_vocab, 30000), (bs, seq))
            model(tokens, stop_at_layer=model.cfg.n_layers)  # warm-up
            reps = max(1, 64 // bs)
            t = time.perf_counter()
            for _ in range(reps):
                model(tokens, return_type="logits")
            full = reps * bs * seq / (time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(reps):
                model(tokens, stop_at_layer=model.cfg.n_layers)
            body = reps * bs * seq / (time.perf_counter() - t)
            out[f"tok_per_s_full_bs{bs}"] = full
            out[f"tok_per_s_no_unembed_bs{bs}"] = body

    if name == "factworld":
        from kvmem.factworld import shipped_world
        from kvmem.core.facts import Fact

        world = shipped_world()
        for split in ("train", "paraphrase"):
            # Every (fact, template) prompt of the split.
            facts = [Fact(w.prompt, w.subject, target_true=w.target_true) for w in world.all_prompts(split)]
            t = time.perf_counter()
            res = fact_recall(model, facts, batch_size=64)
            out[f"{split}_n"] = len(facts)
            out[f"{split}_top1"] = res.top_k(1)
            out[f"{split}_top5"] = res.top_k(5)
            out[f"{split}_recall_s"] = time.perf_counter() - t
    if known is not None:
        facts = load_known_facts(known, limit=known_limit)
        t = time.perf_counter()
        res = fact_recall(model, facts, batch_size=32)
        out["known_n"] = len(facts)
        out["known_top1"] = res.top_k(1)
        out["known_top5"] = res.top_k(5)
        out["known_recall_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def models_table(rows: list[dict]) -> str:
    cols = [
        ("model", "model", "{}"),
        ("load_cold_s", "cold load s", "{:.1f}"),
        ("load_cached_s", "cached load s", "{:.1f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
        ("tok_per_s_full_bs1", "tok/s bs1", "{:.0f}"),
        ("tok_per_s_full_bs8", "tok/s bs8", "{:.0f}"),
        ("tok_per_s_full_bs32", "tok/s bs32", "{:.0f}"),
        ("tok_per_s_no_unembed_bs32", "tok/s bs32 no unembed", "{:.0f}"),
        ("known_top1", "known_1000 top-1", "{:.1%}"),
        ("known_top5", "known_1000 top-5", "{:.1%}"),
        ("train_top1", "own facts top-1 (train tmpl)", "{:.1%}"),
        ("paraphrase_top1", "own facts top-1 (held-out tmpl)", "{:.1%}"),
    ]
    return table([c[1] for c in cols], [[fmt.format(r[k]) if k in r else "–" for k, _, fmt in cols] for r in rows])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["factworld", "gemma-3-270m"])
    ap.add_argument("--known-limit", type=int, default=None, help="first N known_1000 facts (default all 1209)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out-dir", default=str(results_dir("models")))
    add_data_arguments(ap, "known")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    known = data_file(args, "known", required=False)
    if args.one:
        print(json.dumps(measure(args.one, args.cache, known, args.known_limit, args.batch_sizes)))
        return
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="kvmem-bench-cache-") as cache:
            cmd = [sys.executable, __file__, "--one", name, "--cache", cache, "--batch-sizes", *map(str, args.batch_sizes)]
            if args.known_limit:
                cmd += ["--known-limit", str(args.known_limit)]
            if known is not None:
                cmd += ["--known", known]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"measuring {name} failed")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1], indent=1))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(__file__, argv)
    # Models measured in earlier runs stay in the table (each row records its own command and time).
    for r in rows:
        r["command"], r["when"], r["commit"] = prov["command"], prov["date"], prov["commit"]
    previous = out / "models.json"
    if previous.exists():
        kept = [r for r in json.loads(previous.read_text())["rows"] if r["model"] not in {x["model"] for x in rows}]
        rows = kept + rows
    meta = {**prov, "python": platform.python_version()}
    (out / "models.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = f"Measured by `benchmarks/bench_models.py` on {meta['machine']}; per row: " + "; ".join(
        f"{r['model']}: `{r.get('command', meta['command'])}` ({r.get('when', meta['date'])})" for r in rows
    ) + ".\n\n" + models_table(rows) + "\n"
    (out / "models.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
