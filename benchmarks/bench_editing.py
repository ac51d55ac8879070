"""ROME on CounterFact (and on the fact world): the ROME table, time per edit, C throughput.

    python benchmarks/bench_editing.py --models gemma-3-270m --n-records 250 --stats-tokens 200000
    python benchmarks/bench_editing.py --models factworld --n-records 50

Per model: C (second moment of the edit layer's keys) over ordinary text with its convergence and
throughput next to a plain forward over the same token rows; then, per record, the unedited
model's metrics and the metrics with that record's ROME edit applied alone (then restored);
ROME's summary table next to ROME's published GPT-2 XL numbers. Results go to
benchmarks/results/editing/editing.json and .md (or --out PREFIX). Per-record results are logged to
PREFIX_<model>_records.jsonl as they finish: rerunning the same command resumes (eval_s then
counts this invocation only); --restart starts over.

Splitting a run over processes or machines: `--shard I/N` evaluates every N-th record into
PREFIX_<model>_records.shardIofN.jsonl (no summary); `--merge N` joins the N shard logs into the
run's log and summarises the records in it (as --logged-only). --device cuda runs on a GPU.

Records on factworld: `kvmem.factworld.counterfact_records(n_neighbours=10, seed=--seed)`,
those with neighbours and a new object, each with its own prompt as the generation prompt; C over
`kvmem.factworld.corpus()`. Elsewhere: the CounterFact file (--counterfact, else from the data
folder: --data, $KVMEM_DATA, or ../shared/data beside the repository) and the corpus (--corpus).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

from common import (RunPlan, add_data_arguments, add_run_arguments, check_run_arguments, data_file, data_name,
                    mean_difference, peak_rss_mb, provenance, provenance_line, results_dir, table, tiny_random_model)


# --- models and records -------------------------------------------------------------------

def load(name: str, device: str | None = None):
    if name == "tiny":  # a random 3-layer GPT-2-style model: exercises the pipeline only
        return tiny_random_model(n_ctx=128, device=device)
    if name == "factworld":
        from kvmem.factworld import factworld_model

        return factworld_model(device=device)
    import kvmem.models

    return kvmem.models.load_model(name, device=device)


def factworld_records(n: int, seed: int = 0):
    """`n` of the world's CounterFact records (`kvmem.factworld.counterfact_records`, 10
    neighbours, sampled with `seed`), skipping those without neighbours or without another object;
    GE is measured on each record's own prompt (the world has no generation prompts)."""
    from kvmem.factworld import counterfact_records

    records = counterfact_records(n_neighbours=10, seed=seed)
    usable = [r for r in records if r.neighborhood_prompts and r.request.target_new != r.request.target_true]
    return [dataclasses.replace(r, generation_prompts=(r.request.prompt,)) for r in usable[:n]]


def records_for(name: str, args):
    if name == "factworld":
        return factworld_records(args.n_records, args.seed), "factworld (own facts)"
    from kvmem.data import load_counterfact

    return load_counterfact(data_file(args, "counterfact"), limit=args.n_records), data_name(args, "counterfact")


# --- throughput --------------------------------------------------------------------------

def plain_forward_tok_s(model, corpus, n_tokens: int, layer: int | None) -> float:
    """Tokens/s of a plain no-grad forward (no hooks, no unembedding) over the same token rows
    that `second_moment` uses; stops after `layer` if given, else runs all layers."""
    import torch

    # second_moment's own token rows and batching, so that both sides of the ratio see the same tokens.
    from kvmem.editing.stats import length_batches, corpus_token_rows
    from kvmem.core.tokenize import pad_batch, spec_for

    rows, total, has_bos = corpus_token_rows(model, corpus, n_tokens, min(256, int(model.cfg.n_ctx)))
    spec = spec_for(model)
    stop = model.cfg.n_layers if layer is None else layer + 1
    t = time.perf_counter()
    with torch.no_grad():
        for b in length_batches(rows, 4096):
            model(pad_batch(b, spec.pad_id).tokens, stop_at_layer=stop)
    return total / (time.perf_counter() - t)


# --- one model -----------------------------------------------------------------------------

def run_model(name: str, args) -> dict:
    import torch

    from kvmem.editing import rome_hparams, second_moment
    from kvmem.editing.rome import edit_layer
    from kvmem.evaluation import evaluate_counterfact

    out: dict = {"model": name, "threads": torch.get_num_threads()}
    t = time.perf_counter()
    model = load(name, args.device)
    if str(model.cfg.device).startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    for p in model.parameters():
        p.requires_grad_(False)
    out["load_s"] = time.perf_counter() - t
    hp = rome_hparams(model)
    layer = edit_layer(model, hp, args.layer)
    out.update(layer=layer, layer_source=hp.layer_source if args.layer is None else "--layer",
               n_contexts=hp.n_contexts, hparams=dataclasses.asdict(hp))
    if name == "factworld":
        from kvmem.factworld import corpus
        corpus = corpus()
    else:
        corpus = data_file(args, "corpus")
    out["corpus"] = "fact-world training sentences" if name == "factworld" else str(corpus)

    sm = second_moment(model, layer, corpus, n_tokens=args.stats_tokens, cache_dir=args.cache_dir,
                       recompute=args.recompute_stats, progress=not args.quiet)
    out["stats"] = {
        "n_tokens": sm.n_tokens, "seconds": sm.seconds, "tok_per_s": sm.tokens_per_s, "from_cache": sm.from_cache,
        "eigmin": sm.eigmin, "eigmax": sm.eigmax, "condition_number": sm.condition_number,
        "convergence": sm.convergence().to_dict(orient="list"), "path": sm.path,
    }
    n_tp = min(args.stats_tokens, args.throughput_tokens)
    plan = RunPlan.from_args(args, f"{args.out}_{name.replace('/', '_')}_records.jsonl")
    shard = plan.shard
    if shard is None:
        out["plain_forward_tok_s_to_layer"] = plain_forward_tok_s(model, corpus, n_tp, layer)
        out["plain_forward_tok_s_all_layers"] = plain_forward_tok_s(model, corpus, n_tp, None)
    if not math.isnan(sm.tokens_per_s) and shard is None:
        out["stats_vs_plain_to_layer"] = sm.tokens_per_s / out["plain_forward_tok_s_to_layer"]
        out["stats_vs_plain_all_layers"] = sm.tokens_per_s / out["plain_forward_tok_s_all_layers"]

    records, source = records_for(name, args)
    plan.merge_shards("records")
    n_requested = len(records)
    records = plan.select(records, lambda r: str(r.case_id))
    out["records"] = {"source": source, "n": len(records), "n_requested": n_requested,
                      "merged_shards": args.merge}
    if args.clamp_norm_factor is not None:
        hp = dataclasses.replace(hp, clamp_norm_factor=args.clamp_norm_factor)
        out["hparams"] = dataclasses.asdict(hp)
    ns = None
    if args.null_space is not None:  # AlphaEdit's constraint on each ROME update, from the same C
        from kvmem.editing.nullspace import null_space

        ns = null_space(sm, threshold=args.null_space)
        out["null_space"] = {"threshold": ns.threshold, "rank": ns.rank, "d_mlp": ns.d_mlp}
    t = time.perf_counter()
    ev = evaluate_counterfact(
        model, records, stats=sm, hparams=dataclasses.replace(hp, layer=layer), null_space=ns,
        generation=args.gen_tokens > 0, gen_prompts=args.gen_prompts, gen_tokens=args.gen_tokens,
        seed=args.seed, progress=not args.quiet,
        log=str(plan.write_log), restart=args.restart,
    )
    out["eval_s"] = time.perf_counter() - t
    if shard is not None:
        return out
    summ = ev.summary()
    out["summary"] = json.loads(summ.to_json(orient="index"))
    frame = ev.to_frame()
    ok = frame[(frame["condition"] == "ROME") & frame["error"].isna()]
    out["edit_s_mean"] = float(ok["edit_s"].mean()) if len(ok) else float("nan")
    out["edit_s_median"] = float(ok["edit_s"].median()) if len(ok) else float("nan")
    out["errors"] = frame[frame["error"].notna()][["case_id", "error"]].to_dict(orient="records")
    out["summary_md"] = ev.to_markdown()
    out["peak_rss_mb"] = peak_rss_mb()
    records_csv = Path(f"{args.out}_{name.replace('/', '_')}_records.csv")
    frame.to_csv(records_csv, index=False)
    out["records_csv"] = str(records_csv)
    if args.paired_with:
        out["paired"] = paired_differences(frame, args.paired_with)
    return out


def paired_differences(frame, other_csv: str, metrics=("ES", "PS", "NS"), n_boot: int = 2000) -> dict:
    """This run's edited metrics minus another run's (its records CSV) on the records both edited,
    with 95% bootstrap CIs; the unedited rows must agree, else the two runs scored other things."""
    import numpy as np
    import pandas as pd

    other = pd.read_csv(other_csv)
    mine = frame[frame["error"].isna()].set_index(["condition", "case_id"])
    theirs = other[other["error"].isna()].set_index(["condition", "case_id"])
    both = sorted(set(mine.loc["ROME"].index) & set(theirs.loc["ROME"].index))
    base = [c for c in both if c in mine.loc["unedited"].index and c in theirs.loc["unedited"].index]
    unedited_gap = max((abs(mine.loc[("unedited", c), m] - theirs.loc[("unedited", c), m])
                        for c in base for m in metrics), default=float("nan"))
    out = {"other": str(other_csv), "n": len(both), "unedited_max_abs_diff": float(unedited_gap)}
    for m in metrics:
        this = [mine.loc[("ROME", c), m] for c in both]
        that = [theirs.loc[("ROME", c), m] for c in both]
        diff = mean_difference(this, that, n_boot=n_boot)
        out[m] = {"this": float(np.nanmean(this)), "other": float(np.nanmean(that)), "diff": diff["diff"], "ci": diff["ci"]}
    return out


def markdown(results: list[dict], prov: dict) -> str:
    from kvmem.evaluation import markdown_table, published_table

    lines = ["# ROME editing benchmark", "", provenance_line(prov), ""]
    lines += ["ROME's published GPT-2 XL numbers (CounterFact; the cells kvmem compares against):", "",
              markdown_table(published_table()), ""]
    for r in results:
        s = r["stats"]
        lines += [f"## {r['model']}", "",
                  f"Edit layer {r['layer']} ({r['layer_source']}); {r['n_contexts']} contexts for k*/v*; "
                  f"v* norm clamp {r['hparams']['clamp_norm_factor']} x |v_init|; "
                  + (f"GPU: {r['gpu']}; " if r.get("gpu") else "")
                  + (f"ROME's update confined to C's null space (AlphaEdit's constraint: eigenvalues of C below "
                     f"{r['null_space']['threshold']:g}, rank {r['null_space']['rank']} of {r['null_space']['d_mlp']}); "
                     if r.get("null_space") else "") +
                  f"records: {r['records']['source']} (n={r['records']['n']} of {r['records'].get('n_requested', '?')} requested"
                  + (f"; evaluated by {r['records']['merged_shards']} parallel processes, whose times per edit "
                     "include their contention" if r['records'].get('merged_shards') else "") + ").", "",
                  r["summary_md"], "",
                  f"- time per edit (k*, v*, update; excluding C): mean {r['edit_s_mean']:.2f} s, median {r['edit_s_median']:.2f} s",
                  f"- C: {s['n_tokens']} tokens, " + ("loaded from cache" if s["from_cache"] else f"{s['seconds']:.1f} s") + ", "
                  f"{s['tok_per_s']:.0f} tok/s; plain forward to the edit layer {r['plain_forward_tok_s_to_layer']:.0f} tok/s, "
                  f"all layers (no unembedding) {r['plain_forward_tok_s_all_layers']:.0f} tok/s; ratio "
                  f"{r.get('stats_vs_plain_to_layer', float('nan')):.0%} / {r.get('stats_vs_plain_all_layers', float('nan')):.0%}",
                  f"- C eigenvalues {s['eigmin']:.3g} .. {s['eigmax']:.3g}; relative change between the last "
                  f"checkpoints: {', '.join(f'{x:.2e}' for x in s['convergence']['rel_change'][-3:])} "
                  f"(at {', '.join(str(x) for x in s['convergence']['tokens_seen'][-3:])} tokens)",
                  f"- peak RSS {r['peak_rss_mb']:.0f} MB; failed edits: {len(r['errors'])}", ""]
        if r.get("paired"):
            p = r["paired"]
            lines += [f"Paired with `{p['other']}` on the {p['n']} records both runs edited (this run minus that one, "
                      f"×100, 95% bootstrap CI; their unedited metrics differ by at most {p['unedited_max_abs_diff']:.2g}):", "",
                      table(["metric", "this run", "other run", "difference [95% CI]"],
                            [[m, f"{100 * v['this']:.1f}", f"{100 * v['other']:.1f}",
                              f"{100 * v['diff']:+.1f} [{100 * v['ci'][0]:+.1f}, {100 * v['ci'][1]:+.1f}]"]
                             for m, v in p.items() if isinstance(v, dict)]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gemma-3-270m"])
    ap.add_argument("--n-records", type=int, default=250)
    ap.add_argument("--stats-tokens", type=int, default=200_000)
    ap.add_argument("--throughput-tokens", type=int, default=20_000, help="tokens for the plain-forward comparison")
    add_data_arguments(ap, "counterfact", "corpus")
    ap.add_argument("--layer", type=int, default=None, help="override the preset's edit layer")
    ap.add_argument("--gen-prompts", type=int, default=None, help="generation prompts per record for GE (default all)")
    ap.add_argument("--gen-tokens", type=int, default=100, help="tokens per generation (0: skip GE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--recompute-stats", action="store_true")
    ap.add_argument("--out", default=str(results_dir("editing") / "editing"), help="output prefix (.json, .md)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--clamp-norm-factor", type=float, default=None, help="override the preset's v* norm clamp")
    ap.add_argument("--null-space", type=float, default=None, metavar="THRESHOLD",
                    help="confine each ROME update to the null space of C (AlphaEdit; eigenvalues below THRESHOLD, e.g. 0.02)")
    ap.add_argument("--paired-with", default=None, metavar="CSV",
                    help="another run's records CSV: ES/PS/NS differences on the records both edited, with CIs")
    add_run_arguments(ap, "records")
    args = ap.parse_args(argv)
    check_run_arguments(ap, args)
    results = []
    for name in args.models:
        print(f"== {name}", flush=True)
        results.append(run_model(name, args))
        if args.shard is not None:
            print(f"shard {args.shard}: {results[-1]['records']['n']} records, {results[-1]['eval_s']:.0f} s", flush=True)
            continue
        print(results[-1]["summary_md"], flush=True)
    if args.shard is not None:
        return results
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prov = provenance(__file__, argv, args.device)
    Path(f"{out}.json").write_text(json.dumps({**prov, "argv": sys.argv[1:] if argv is None else argv, "results": results},
                                              indent=1, default=str))
    Path(f"{out}.md").write_text(markdown(results, prov))
    return results


if __name__ == "__main__":
    main()
