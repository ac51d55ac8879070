"""ROME's average indirect effect (fig. 2) over the known facts a model answers correctly.

    python benchmarks/trace_known_facts.py --model gemma-3-270m --n-facts 150
    python benchmarks/trace_known_facts.py --model factworld --n-facts 200
    python benchmarks/trace_known_facts.py --model gemma-3-270m --n-facts 1000 --method eap-ig --steps 4 \
        --tag eap-ig4 --noise 3.0930848121643066   # every known fact it answers, estimated (issue 21)

Facts: `known_1000.json` for real models (the first `--n-facts` the model answers top-1, in file
order), the shipped world's training facts for factworld (every 7th, to spread over subjects and
relations). Window 10 (n_layers // 2 on models with fewer than 10 layers), 10 noise samples, noise 3 x std of the
subject embeddings over the chosen facts, as ROME.

The run is resumable: per-fact results go to `benchmarks/results/tracing/aie_<model>.jsonl` as they finish;
rerunning the same command continues. Writes `aie_<model>.json`, `.md` and `aie_<model>.png`
(`aie_<model>_<tag>.*` with --tag). `--method` estimates the grids by attribution patching
(`average_indirect_effect(method=...)`, docs/attribution.md) on the same noise samples;
`aie_attribution.py` sets such a run beside the exact one.

Splitting a run over processes or machines: `--shard I/N` traces every N-th chosen fact into
`aie_<model>.shardIofN.jsonl` (no summary); `--merge N` joins the N shard logs into the run's log
and summarises the facts in it (as --logged-only). --device runs on a GPU, e.g. --device cuda.
`known_1000.json` is read from --known, else from the data folder (--data, $KVMEM_DATA, or
../shared/data beside the repository).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import (RunPlan, add_data_arguments, add_run_arguments, check_run_arguments, data_file, provenance,
                    provenance_line, results_dir)


def choose_facts(model, name: str, n: int, scan: int, args):
    from kvmem.core.facts import Fact

    if name == "factworld":
        from kvmem.factworld import shipped_world

        pool = [Fact(f.prompt, f.subject, target_true=f.target_true, relation_id=f.relation_id)
                for f in shipped_world().facts("train")[::7]]
    else:
        from kvmem.data import load_known_facts

        pool = load_known_facts(data_file(args, "known"), limit=scan)
    from kvmem.recall import fact_recall

    res = fact_recall(model, pool, batch_size=16, progress=False)
    frame = res.to_frame()
    correct = [f for f, ok in zip(pool, frame["rank"] == 0) if ok]
    # known_1000 repeats a few (prompt, subject, target) triples: trace each once
    from kvmem.tracing import fact_key

    seen: set[str] = set()
    correct = [f for f in correct if not (fact_key(f) in seen or seen.add(fact_key(f)))]
    return correct[:n], len(pool), len(correct)


def peak(aie, kind: str, bucket: str):
    row = aie[kind][aie.buckets.index(bucket)]
    layer = int(row.argmax())
    return layer, float(row[layer])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="factworld")
    ap.add_argument("--n-facts", type=int, default=150)
    ap.add_argument("--scan", type=int, default=None, help="known_1000 facts scanned for correct ones (default all)")
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=str(results_dir("tracing")))
    ap.add_argument("--noise", type=float, default=None,
                    help="noise std (default: 3 x std of the chosen facts' subject embeddings, as ROME)")
    ap.add_argument("--choose-only", action="store_true",
                    help="print how many facts are chosen and the default noise, then stop")
    ap.add_argument("--tag", default=None, help="suffix of the output names (aie_<model>_<tag>.*)")
    ap.add_argument("--method", default=None, choices=["atp", "atp*", "ig", "eap-ig"],
                    help="estimate each fact's grids by attribution (kvmem.tracing.attribution) instead of "
                         "tracing exactly; give a --tag so the exact run's files stay")
    ap.add_argument("--steps", type=int, default=None, help="path steps of --method ig / eap-ig")
    add_data_arguments(ap, "known")
    add_run_arguments(ap, "facts")
    from kvmem.cli.runtime import add_executor_options, executor

    add_executor_options(ap)  # --executor ray: facts on Ray workers (docs/scaling.md)
    args = ap.parse_args(argv)
    check_run_arguments(ap, args)
    if args.shard and args.executor != "serial":
        ap.error("--shard splits a run by hand; with --executor ray one run covers every fact")
    if args.method and not args.tag:
        ap.error("--method writes an estimated AIE: give it a --tag (e.g. --tag eap-ig4)")
    if args.steps is not None and not args.method:
        ap.error("--steps goes with --method")
    if args.shard and args.choose_only:
        ap.error("--shard traces; it does not combine with --choose-only")

    import matplotlib

    matplotlib.use("Agg")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import kvmem
    from kvmem.tracing import average_indirect_effect, noise_level

    from kvmem.runs import log_settings

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"aie_{args.model}" + (f"_{args.tag}" if args.tag else "")
    log_path = out / f"{stem}.jsonl"
    plan = RunPlan.from_args(args, log_path)
    plan.merge_shards("facts")
    model = kvmem.load_model(args.model, device=args.device)
    window = args.window or kvmem.config.trace_window(model.cfg.n_layers)
    facts, scanned, n_correct = choose_facts(model, args.model, args.n_facts, args.scan, args)
    # over all chosen facts, so a resumed run keeps the same noise
    noise = args.noise if args.noise is not None else noise_level(model, facts)
    n_chosen = len(facts)
    if args.choose_only:
        print(json.dumps({"facts_chosen": n_chosen, "facts_scanned": scanned, "noise": noise}), flush=True)
        return {"facts_chosen": n_chosen, "noise": noise}
    from kvmem.tracing import fact_key

    facts = plan.select(facts, fact_key)
    if plan.summarising and log_path.exists():
        # the noise the log was traced with: computed on another device it may differ in the last bits
        noise = log_settings(log_path).get("noise", noise)
    if plan.shard is not None and not facts:
        print(f"shard {args.shard}: nothing left to trace", flush=True)
        return {"shard": args.shard, "n_facts": 0}
    t0 = time.perf_counter()
    aie = average_indirect_effect(
        model, facts, window=window, noise=noise, samples=args.samples, seed=args.seed,
        log=str(plan.write_log), restart=args.restart, executor=executor(args), method=args.method,
        steps=args.steps,
    )
    this_run = time.perf_counter() - t0
    if plan.shard is not None:
        print(f"shard {args.shard}: {aie.n_facts} facts traced, {aie.n_skipped} skipped, {this_run:.0f} s", flush=True)
        return {"shard": args.shard, "n_facts": aie.n_facts}
    records = [json.loads(l)["record"] for l in log_path.read_text().splitlines()[1:]]
    fact_seconds = sum(r["seconds"] for r in records)
    summary = {
        **provenance(__file__, argv, model.cfg.device),
        "model": args.model, "n_layers": model.cfg.n_layers, "method": args.method or "exact",
        "steps": args.steps,
        "facts_scanned": scanned, "facts_correct_in_scan": n_correct, "facts_chosen": n_chosen,
        "n_facts": aie.n_facts, "n_skipped": aie.n_skipped, "window": window, "samples": args.samples,
        "noise": aie.noise, "p_clean": aie.p_clean, "p_corrupt": aie.p_corrupt, "total_effect": aie.total_effect,
        "wall_seconds_all_facts": round(fact_seconds, 1), "wall_seconds_this_invocation": round(this_run, 1),
        "bucket_counts": dict(zip(aie.buckets, aie.counts.tolist())),
        "aie": {k: {b: aie[k][i].tolist() for i, b in enumerate(aie.buckets)} for k in aie.kinds},
        "peaks": {
            f"{k} @ {b}": dict(zip(("layer", "aie"), peak(aie, k, b)))
            for k in aie.kinds for b in ("last subject token", "last token")
        },
    }
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    fig = aie.plot(title=f"{args.model}: AIE over {aie.n_facts} known facts (window {window})")
    fig.savefig(out / f"{stem}.png", dpi=110, bbox_inches="tight")

    lines = [
        provenance_line(summary),
        "",
        (f"{aie.n_facts} facts answered correctly (the first {aie.n_facts} of the {n_chosen} chosen: the first "
         if not plan.summarising else
         f"{aie.n_facts} facts answered correctly (those the run's log holds, of the {n_chosen} chosen: the first ")
        + f"correct ones of {scanned} scanned; "
        + ("noise given by --noise" if args.noise is not None else f"noise from all {n_chosen}") + "), "
        f"{args.samples} noise samples, noise {aie.noise:.4g}, window {window} for mlp/attn"
        + (f", estimated by attribution method {args.method!r} (steps {args.steps or 'default'})" if args.method
           else "") + ". "
        f"Mean p_clean {aie.p_clean:.3f}, p_corrupt {aie.p_corrupt:.3f}, total effect {aie.total_effect:.3f}. "
        f"Tracing time {fact_seconds:.0f} s ({fact_seconds / max(1, len(records)):.1f} s per fact"
        + (f"; summed over facts traced in {args.merge} parallel shards" if args.merge else "") + ").",
        "",
        "Peak AIE by layer (ROME's two sites):",
        "",
        "| kind | token | peak layer | AIE at peak | AIE mean over layers |",
        "|---|---|---|---|---|",
    ]
    for k in aie.kinds:
        for b in ("last subject token", "last token"):
            layer, val = peak(aie, k, b)
            mean = float(aie[k][aie.buckets.index(b)].mean())
            lines.append(f"| {k} | {b} | {layer} | {val:.4f} | {mean:.4f} |")
    lines += ["", "AIE by layer (rows: kind @ bucket; columns: layers):", "",
              "| kind @ bucket | " + " | ".join(str(i) for i in range(model.cfg.n_layers)) + " |",
              "|---|" + "---|" * model.cfg.n_layers]
    for k in aie.kinds:
        for i, b in enumerate(aie.buckets):
            vals = aie[k][i].tolist()
            lines.append(f"| {k} @ {b} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines += ["", f"Figure: `{stem}.png`. Per-fact records (bucket effects and full score grids): `{stem}.jsonl`."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
