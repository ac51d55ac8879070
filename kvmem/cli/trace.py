"""`kvmem trace`: the causal trace of one fact, or the average indirect effect over `--facts`."""

from __future__ import annotations

import argparse
import time

from kvmem.data import CounterFactRecord
from kvmem.errors import InvalidArgumentError

from kvmem.cli import batch, common, options, runtime


def cmd_trace(args: argparse.Namespace) -> int:
    if getattr(args, "method", "exact") == "exact" and getattr(args, "steps", None) is not None:
        raise InvalidArgumentError("--steps goes with --method ig or eap-ig.")  # before the model loads
    if args.facts:
        return _trace_dataset(args)
    ray_flags = args.executor != "serial" or args.address or args.workers or args.gpus_per_worker
    if args.on_error != "stop" or args.limit is not None or args.restart or ray_flags:
        raise InvalidArgumentError("--limit, --on-error, --restart and --executor (--address, --workers, "
                                   "--gpus-per-worker) go with --facts FILE (dataset mode).")
    common.no_display()
    from kvmem.pipelines.four_views import trace_peak
    from kvmem.tracing import trace_all

    out = common.check_out(args.out)
    t0 = time.perf_counter()
    model = common.load_model(args.model, args.quiet, args.device)
    fact = options.single_fact(args)
    method = getattr(args, "method", "exact")
    if method == "exact":
        traces = trace_all(model, fact, window=args.window, kinds=args.kinds, samples=args.samples, seed=args.seed,
                           progress=not args.quiet)
    else:
        from kvmem.tracing import attribution_trace_all

        traces = attribution_trace_all(model, fact, method=method, steps=args.steps, window=args.window,
                                       kinds=args.kinds, samples=args.samples, seed=args.seed)
    common.write_figure(out / "trace.png", traces.plot(title=f"{fact.prompt!r} -> {traces.traces[0].answer!r}"))
    common.write(out / "trace.html", traces.show().page())
    common.write(out / "trace.csv", traces.to_frame().to_csv(index=False))
    summary = {"model": args.model, "method": traces.traces[0].method,
               "prompt": fact.prompt, "subject": fact.subject, "answer": traces.traces[0].answer,
               "p_clean": traces.p_clean, "p_corrupt": traces.p_corrupt, "seconds": round(time.perf_counter() - t0, 2)}
    for t in traces:
        layer, pos, ie = trace_peak(t)
        summary[f"{t.kind}_peak"] = {"layer": layer, "token": t.str_tokens[pos], "pos": pos, "indirect_effect": ie}
    common.write_json(out / "summary.json", summary)
    common.say(args, common.json_text(summary).rstrip())
    common.say(args, f"wrote {out}/trace.png, trace.html, trace.csv, summary.json")
    return 0


def _aie_json(result) -> dict:
    return {
        "method": result.method, "kinds": list(result.kinds), "buckets": list(result.buckets), "window": result.window,
        "samples": result.samples, "noise": result.noise, "n_facts": result.n_facts, "n_skipped": result.n_skipped,
        "p_clean": result.p_clean, "p_corrupt": result.p_corrupt, "counts": result.counts.tolist(),
        "aie": {k: {b: result.aie[i, j].tolist() for j, b in enumerate(result.buckets)}
                for i, k in enumerate(result.kinds)},
    }


def _fact_row(rec: CounterFactRecord, logged: dict) -> dict:
    """One row of facts.csv: the fact, its answer, and per kind the layer where its own indirect
    effect at the last subject token peaks (bucket 2 of `token_buckets`)."""
    row = {"record": rec.file_index, "case_id": rec.case_id, "prompt": logged["prompt"], "subject": logged["subject"],
           "target": logged["target"], "answer": logged["answer"], "correct": logged["correct"],
           "p_clean": logged["p_clean"], "p_corrupt": logged.get("p_corrupt")}
    for kind, buckets in (logged.get("bucket_ie") or {}).items():
        last_subject = buckets[2]
        if last_subject is not None:
            row[f"{kind}_peak_layer_last_subject"] = max(range(len(last_subject)), key=last_subject.__getitem__)
    return row


def _trace_dataset(args: argparse.Namespace) -> int:
    import pandas as pd

    from kvmem.runs import RunLog, log_settings
    from kvmem.tracing import average_indirect_effect, noise_level

    method = getattr(args, "method", "exact")
    out, model, records, skipped = batch.start(args)
    facts = [r.request for r in records]
    log = out / "trace_log.jsonl"
    t0 = time.perf_counter()
    result = average_indirect_effect(
        model, facts, kinds=args.kinds, window=args.window,
        noise=noise_level(model, facts),  # ROME's 3 x std over the whole data set
        samples=args.samples, seed=args.seed, progress=not args.quiet, log=str(log), restart=args.restart,
        method=None if method == "exact" else method, steps=getattr(args, "steps", None),
        executor=runtime.executor(args),
    )
    logged = RunLog(log, log_settings(log))
    files = common.write_table(out, "aie", result.to_frame())
    files += common.write_table(out, "facts", pd.DataFrame([_fact_row(r, logged[batch.key(r)]) for r in records]))
    common.write_json(out / "aie.json", _aie_json(result))
    common.write_json(out / "facts.json", [common.strip_timing(logged[batch.key(r)]) | {"record": r.file_index}
                                           for r in records])
    estimated = "" if result.method == "exact" else f", estimated by {result.method}"
    common.write_figure(out / "aie.png", result.plot(title=f"{args.model}: {result.n_facts} facts "
                                                           f"({result.n_skipped} answered wrongly, skipped{estimated})"))
    summary = {"command": "trace", "model": args.model, "method": result.method, "facts_file": str(args.facts),
               "n_records": len(records),
               "n_traced": result.n_facts, "n_wrong": result.n_skipped, "skipped_records": skipped,
               "p_clean": result.p_clean, "p_corrupt": result.p_corrupt}
    common.write_json(out / "summary.json", summary)
    common.say(args, f"{result.n_facts} facts traced, {result.n_skipped} answered wrongly (not averaged), "
                     f"{len(skipped)} records skipped; {time.perf_counter() - t0:.1f} s")
    if result.n_facts:
        i = result.kinds.index("mlp") if "mlp" in result.kinds else 0
        curve = result.aie[i, 2]
        common.say(args, f"{result.kinds[i]} AIE at the last subject token peaks at layer {int(curve.argmax())} "
                         f"({float(curve.max()):.3f})")
    common.say(args, f"wrote {out}/: aie.json, aie.png, facts.json, {', '.join(files)}, summary.json "
                     f"(log: {log.name})")
    return 0
