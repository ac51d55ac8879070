"""Why does ROME's neighbourhood score (NS) drop on a model? Ablations over one set of edits.

    python benchmarks/editing_neighbourhood.py --model gemma-3-270m --n-records 20 --layers 5 4 \
        --stats-tokens 200000 1000000 --strengths 0.5 0.25

ROME's v* (the optimised, costly part) does not depend on the key statistics C; only the update's
direction u = C⁻¹k* does. So per record and layer this computes the edit once (with the first
`--stats-tokens` C) and then re-inserts the same k* → v* (`kvmem.editing.reinsert`) with
  - C from each `--stats-tokens` count (is C converged enough?), from `--alt-corpus` (does the
    text C is taken over matter?), and no C at all (u = k*: how much does C buy?);
  - a weaker change, v_old + s·(v* − v_old) for each `--strengths` s (is the edit simply too strong?);
and re-optimises v* for each `--kl-factors` value (does the KL term protect neighbours?) and each
`--clamp-factors` value (ROME bounds ‖δ‖ by clamp_norm_factor × ‖v_init‖; is that bound what sets
the edit's size?).
Each condition is applied alone, measured (ES, PS, NS, NM; no generation) and restored.

Per neighbourhood prompt it also records the margin log p(true) − log p(new) (per token, as NS)
before and after, and the leak of the update into the prompt: |uᵀk| / uᵀk* for the keys k of
every non-start position (max over positions, and at the last position). The update adds
leak × (v* − v_old) to that position's MLP output, so leak says how much of the edit a neighbour
receives. NS only counts sign flips: neighbours the model barely knows flip under a small leak.

Per-record results go to PREFIX.jsonl (resumable; rerun the same command to continue);
PREFIX.json and PREFIX.md summarise. Default PREFIX: benchmarks/results/editing/editing_neighbourhood_<model>.
The CounterFact file and the corpus come from --counterfact / --corpus, else from the data folder
(--data, $KVMEM_DATA, or ../shared/data beside the repository).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from common import add_data_arguments, data_file, data_name, provenance, provenance_line, results_dir


def stats_variants(model, layer: int, args) -> dict:
    """name -> SecondMoment (or None for u = k*), the reference (first) one first."""
    from kvmem.editing import second_moment

    out = {}
    for n in args.stats_tokens:
        out[f"C {n // 1000}k"] = second_moment(model, layer, data_file(args, "corpus"), n_tokens=n,
                                               progress=not args.quiet)
    if args.alt_corpus:
        n = args.stats_tokens[0]
        out[f"C {n // 1000}k {Path(args.alt_corpus).stem}"] = second_moment(
            model, layer, args.alt_corpus, n_tokens=n, progress=not args.quiet)
    out["no C (u = k*)"] = None
    return out


def neighbour_keys(model, layer: int, prompts) -> list[torch.Tensor]:
    """The layer's MLP keys at every non-start position of each prompt (one run each: no padding)."""
    from kvmem.core.tokenize import encode, spec_for
    from kvmem.core.weights import hook_post_name

    spec, name, out = spec_for(model), hook_post_name(model, layer), []
    with torch.no_grad():
        for p in prompts:
            ids = encode(spec, p)
            _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=name, stop_at_layer=layer + 1)
            keys = cache[name][0].double().cpu()
            out.append(keys[1:] if spec.prepends_bos else keys)
    return out


def margins(model, record) -> list[float]:
    """Per neighbourhood prompt: per-token log p(true) − log p(new) (> 0: NS counts it a success)."""
    from kvmem.evaluation import target_logprobs

    rq = record.request
    items = [(p, t) for p in record.neighborhood_prompts for t in (rq.target("true"), rq.target("new"))]
    sums, counts = target_logprobs(model, items)
    s = (sums / counts).view(-1, 2)
    return (s[:, 0] - s[:, 1]).tolist()


def measure(model, record, edit, keys, k_star) -> dict:
    from kvmem.editing import edited
    from kvmem.evaluation import record_metrics

    with edited(model, edit):
        row = record_metrics(model, record, generation=False)
        row["margins"] = margins(model, record)
    u = edit.u.double()
    ref = float(u @ k_star.double())
    row["leak_max"] = [float((k @ u).abs().max() / ref) for k in keys]
    row["leak_last"] = [float((k[-1] @ u).abs() / ref) for k in keys]
    row["delta_norm"] = float(edit.delta().norm())
    return row


def run_record(model, record, layers, stats_by_layer, prefixes, args) -> dict:
    from kvmem.editing import compute_rome_edit, reinsert, rome_hparams
    from kvmem.evaluation import record_metrics
    from kvmem.core.weights import mlp_weights

    out = {"case_id": record.case_id, "subject": record.subject, "conditions": {}}
    base = record_metrics(model, record, generation=False)
    base["margins"] = margins(model, record)
    out["unedited"] = base
    hp0 = rome_hparams(model)
    for layer in layers:
        variants = stats_by_layer[layer]
        ref_name, ref_stats = next(iter(variants.items()))
        hp = dataclasses.replace(hp0, layer=layer)
        t = time.perf_counter()
        edit = compute_rome_edit(model, record.request, layer=layer, stats=ref_stats, hparams=hp, prefixes=prefixes)
        edit_s = time.perf_counter() - t
        keys = neighbour_keys(model, layer, record.neighborhood_prompts)
        conds = out["conditions"]
        for name, sm in variants.items():
            e = edit if name == ref_name else reinsert(model, edit, sm)
            conds[f"L{layer} {name}"] = measure(model, record, e, keys, edit.k_star)
        conds[f"L{layer} {ref_name}"]["edit_s"] = edit_s
        conds[f"L{layer} {ref_name}"]["final_p_target"] = float(edit.loss_trace[-1, 4])
        # how far v* moved, relative to the clamp ROME puts on ‖δ‖ (clamp_norm_factor × ‖v_init‖)
        W = mlp_weights(model, layer)
        v_old = edit.k_star.double() @ W.W_out.detach().double().cpu()
        if W.b_out is not None:
            v_old = v_old + W.b_out.detach().double().cpu()
        conds[f"L{layer} {ref_name}"]["delta_over_clamp"] = float(
            (edit.v_star.double() - v_old).norm() / (hp.clamp_norm_factor * v_old.norm()))
        for s in args.strengths:
            conds[f"L{layer} {ref_name} x{s:g}"] = measure(model, record, reinsert(model, edit, ref_stats, s),
                                                           keys, edit.k_star)
        for kl in args.kl_factors:
            e = compute_rome_edit(model, record.request, layer=layer, stats=ref_stats,
                                  hparams=dataclasses.replace(hp, kl_factor=kl), prefixes=prefixes)
            conds[f"L{layer} {ref_name} kl={kl:g}"] = measure(model, record, e, keys, e.k_star)
        for clamp in args.clamp_factors:
            e = compute_rome_edit(model, record.request, layer=layer, stats=ref_stats,
                                  hparams=dataclasses.replace(hp, clamp_norm_factor=clamp), prefixes=prefixes)
            row = measure(model, record, e, keys, e.k_star)
            row["final_p_target"] = float(e.loss_trace[-1, 4])
            conds[f"L{layer} {ref_name} clamp={clamp:g}"] = row
    return out


def summarise(records: list[dict]) -> dict:
    def mean(xs):
        xs = [x for x in xs if x == x]
        return sum(xs) / len(xs) if xs else float("nan")

    names = list(records[0]["conditions"]) if records else []
    base_m = [m for r in records for m in r["unedited"]["margins"]]
    # neighbours the unedited model ranks true over new by at least a margin: NS restricted to them
    table = {"unedited": {k: 100 * mean(r["unedited"][k] for r in records) for k in ("ES", "PS", "NS")}}
    table["unedited"]["NM"] = 100 * mean(r["unedited"]["NM"] for r in records)
    for name in names:
        rows = [r["conditions"][name] for r in records]
        row = {k: 100 * mean(x[k] for x in rows) for k in ("ES", "PS", "NS", "NM")}
        after = [m for x in rows for m in x["margins"]]
        for lo in (0.0, 1.0, 2.0):
            pairs = [(b, a) for b, a in zip(base_m, after) if b > lo]
            row[f"NS kept (m>{lo:g})"] = 100 * mean(float(a > 0) for _, a in pairs)
        row["leak max"] = mean(v for x in rows for v in x["leak_max"])
        row["leak last"] = mean(v for x in rows for v in x["leak_last"])
        row["norm dW"] = mean(x["delta_norm"] for x in rows)
        if "final_p_target" in rows[0]:
            row["p_new at v*"] = mean(x["final_p_target"] for x in rows)
        if "delta_over_clamp" in rows[0]:
            row["delta / clamp"] = mean(x["delta_over_clamp"] for x in rows)
        table[name] = row
    counts = {f"margin>{lo:g}": sum(b > lo for b in base_m) for lo in (0.0, 1.0, 2.0)}
    return {"n_records": len(records), "neighbour_prompts": len(base_m), "neighbours_by_unedited_margin": counts,
            "median_unedited_margin": sorted(base_m)[len(base_m) // 2] if base_m else float("nan"),
            "table": table}


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"# Why ROME's neighbourhood score drops: {meta['model']}", "",
             f"{provenance_line(meta)} "
             f"{summary['n_records']} CounterFact records, {summary['neighbour_prompts']} neighbourhood prompts.", "",
             "Each ROME condition is one record's edit applied alone (then restored). ES/PS/NS as ROME (%), NM in "
             "points of probability. `NS kept (m>x)`: of the neighbours the unedited model ranks true over new "
             "by more than x nats per token, the share still ranked so after the edit. `leak`: |uᵀk| / uᵀk* for "
             "the neighbour prompts' keys (max over positions / last position); the update adds leak × (v* − "
             "v_old) there. `norm dW`: Frobenius norm of the update. `p_new at v*`: the new target's probability "
             "at the end of v*'s optimisation; `delta / clamp`: ‖v* − v_old‖ over ROME's bound on it "
             "(clamp_norm_factor × ‖v_init‖).", "",
             "Statistics: " + "; ".join(
                 f"layer {l}: " + ", ".join(f"`{n}` = {v['n_tokens']} tokens (last rel. change {v['rel_change_last']:.1e})"
                                            for n, v in d.items() if v) for l, d in meta["stats"].items()) + ".", "",
             f"Unedited neighbour margins: median {summary['median_unedited_margin']:.2f} nats/token; "
             + ", ".join(f"{v} with {k}" for k, v in summary["neighbours_by_unedited_margin"].items()) + ".", ""]
    cols = ["ES", "PS", "NS", "NM", "NS kept (m>0)", "NS kept (m>1)", "NS kept (m>2)", "leak max", "leak last",
            "norm dW", "p_new at v*", "delta / clamp"]
    lines += ["| condition | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in summary["table"].items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("" if v is None else (f"{v:.3f}" if c.startswith(("leak", "norm", "p_new", "delta")) else f"{v:.1f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n-records", type=int, default=20)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: the preset's layer")
    ap.add_argument("--stats-tokens", type=int, nargs="+", default=[200_000], help="first = the edits' own C")
    ap.add_argument("--alt-corpus", default=None, help="also C over this text (first --stats-tokens count)")
    ap.add_argument("--strengths", type=float, nargs="*", default=[0.5])
    ap.add_argument("--kl-factors", type=float, nargs="*", default=[])
    ap.add_argument("--reference-clamp", type=float, default=None,
                    help="ROME's norm clamp for the reference edit (default: the preset's; the runs committed "
                    "before the Gemma preset moved to 1 used 4)")
    ap.add_argument("--clamp-factors", type=float, nargs="*", default=[],
                    help="also re-optimise v* with ROME's norm clamp at these multiples of ||v_init|| (ROME: 4)")
    add_data_arguments(ap, "counterfact", "corpus")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="output prefix (default benchmarks/results/editing/editing_neighbourhood_<model>)")
    ap.add_argument("--restart", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from tqdm.auto import tqdm

    from bench_editing import load  # the same models (and the random "tiny" one for a smoke run)

    from kvmem.data import load_counterfact
    from kvmem.editing import context_prefixes, rome_hparams
    from kvmem.editing.rome import edit_layer
    from kvmem.runs import RunLog, write_atomic

    model = load(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    hp = rome_hparams(model)
    if args.reference_clamp is not None:
        hp = dataclasses.replace(hp, clamp_norm_factor=args.reference_clamp)
    layers = args.layers or [edit_layer(model, hp)]
    prefix = Path(args.out or results_dir("editing") / f"editing_neighbourhood_{args.model}")
    settings = {k: getattr(args, k) for k in ("model", "stats_tokens", "alt_corpus", "strengths", "kl_factors")}
    if args.clamp_factors:  # only when used, so logs of earlier runs still resume
        settings["clamp_factors"] = args.clamp_factors
    # the preset's settings other than its layer (given by --layers) and the layer's provenance note
    settings.update(layers=layers, corpus=data_name(args, "corpus"),
                    hparams={k: v for k, v in dataclasses.asdict(hp).items() if k not in ("layer", "layer_source")})
    log = RunLog(f"{prefix}.jsonl", settings, restart=args.restart)
    stats_by_layer = {l: stats_variants(model, l, args) for l in layers}
    prefixes = context_prefixes(model, hp)
    records = load_counterfact(data_file(args, "counterfact"), limit=args.n_records)
    t0 = time.perf_counter()
    for rec in tqdm(records, desc="records", disable=args.quiet):
        if str(rec.case_id) in log:
            continue
        log.add(str(rec.case_id), run_record(model, rec, layers, stats_by_layer, prefixes, args))
    done = [log.records()[str(r.case_id)] for r in records if str(r.case_id) in log]
    summary = summarise(done)
    meta = {**provenance(__file__, argv, model.cfg.device), "model": args.model, "seconds_this_invocation": round(time.perf_counter() - t0, 1),
            "stats": {l: {n: None if s is None else {"n_tokens": s.n_tokens, "rel_change_last": float(s.rel_change[-1]),
                                                     "condition_number": s.condition_number}
                          for n, s in v.items()} for l, v in stats_by_layer.items()}}
    result = {**meta, "settings": settings, "summary": summary}
    write_atomic(f"{prefix}.json", json.dumps(result, indent=1, default=float))
    write_atomic(f"{prefix}.md", markdown(summary, meta))
    print(markdown(summary, meta))
    return result


if __name__ == "__main__":
    main()
