"""Attribution tracing checked cell by cell against exact causal tracing, and its speed.

    nice -n 10 python benchmarks/bench_attribution.py --model factworld --n-facts 100
    nice -n 10 python benchmarks/bench_attribution.py --model gemma-3-270m --n-facts 130 --steps 1 4 --time-exact-every 5

Per fact and kind (mlp, attn; ROME's window), the exact trace and each estimate on the same noise
samples (`--samples`, seed 0): "atp", "atp*", and "ig" / "eap-ig" with k in `--steps`. Per fact and
estimate: the Spearman correlation of the whole indirect-effect grid (layer x token), of the curve
by layer at the last subject token and at the last token, whether the peak layer of those curves
agrees, and the seconds of the estimate beside the exact trace's (one thread, the same cells, the
corrupted run included in both).

Facts. factworld: the shipped world's training facts (every 7th) the model answers, as
`trace_known_facts.py`. gemma-3-270m: the facts of the committed exact AIE run
(`benchmarks/results/tracing/aie_gemma-3-270m.jsonl`, 150 known_1000 facts Gemma answers), after
its first `--skip` (20); their exact grids come from that log (same noise, samples, seed and
window), so the exact traces are not rerun; every `--time-exact-every`-th fact is traced exactly
again, for the timing ratio and to check the committed grid is reproduced (`exact_max_diff`).
"ig" integrates each cell's own patch (one patched row per cell, sample and step, with a backward):
it costs more than the exact trace by construction, so it is run on factworld only by default.

Resumable: one line per fact in `benchmarks/results/attribution/attribution_<model>.jsonl`
(kvmem.runs.RunLog); rerunning the same command continues. Writes `attribution_<model>.json`
and `.md` (summary over the facts logged so far; `--summary-only` just rewrites them).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from common import provenance, provenance_line, results_dir, table

KINDS = ("mlp", "attn")
TOP = 4  # "exact peak in top": the exact peak layer is among the estimate's TOP highest layers
NEAR = 0.9  # "near peak": the exact effect at the estimate's peak layer is at least this share of the exact peak
AIE_LOG = results_dir("tracing") / "aie_gemma-3-270m.jsonl"


def configs(methods, steps):
    """(method, k, scale) per estimate; a method written "atp:prob" linearises p instead of log p."""
    out = []
    for m in methods:
        m, _, scale = m.partition(":")
        scale = scale or "logprob"
        if m in ("atp", "atp*"):
            out.append((m, 1, scale))
        else:
            out += [(m, k, scale) for k in steps]
    return out


def label(method, k, scale="logprob"):
    name = method if method in ("atp", "atp*") else f"{method}(k={k})"
    return name if scale == "logprob" else f"{name}[{scale}]"


# ---------------------------------------------------------------------------------------------
# Agreement measures (plain: rank with ties averaged, then Pearson)


def _ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for n in range(i, j + 1):
            ranks[order[n]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a, b):
    pairs = [(x, y) for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 3:
        return float("nan")
    ra, rb = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return float("nan") if va == 0 or vb == 0 else cov / math.sqrt(va * vb)


def argmax(xs):
    return max(range(len(xs)), key=lambda i: xs[i])


def compare(exact, est, subject_last, last):
    """Agreement of an estimated grid of indirect effects with the exact one ([layer][pos] lists)."""
    flat_e = [v for row in exact for v in row]
    flat_s = [v for row in est for v in row]
    out = {"grid": spearman(flat_e, flat_s)}
    for name, pos in (("subj", subject_last), ("last", last)):
        ce, cs = [row[pos] for row in exact], [row[pos] for row in est]
        out[f"curve_{name}"] = spearman(ce, cs)
        out[f"peak_{name}"] = argmax(ce) == argmax(cs)
        # window-10 curves are often plateaus whose argmax is decided by noise: also count an
        # estimate whose peak layer is within NEAR of the exact curve's maximum
        out[f"near_{name}"] = ce[argmax(cs)] >= NEAR * max(ce)
        # a pre-screen: is the exact peak among the estimate's TOP highest layers (then tracing
        # those TOP cells exactly finds it)
        top = sorted(range(len(cs)), key=lambda i: -cs[i])[:TOP]
        out[f"top_{name}"] = argmax(ce) in top
    return out


# ---------------------------------------------------------------------------------------------
# Facts


def gemma_facts(skip: int, n: int):
    from kvmem.core.facts import Fact

    lines = AIE_LOG.read_text().splitlines()
    settings = json.loads(lines[0])["settings"]
    facts = []
    for line in lines[1:]:
        r = json.loads(line)["record"]
        if r["correct"]:
            facts.append((Fact(r["prompt"], r["subject"], target_true=r["target"]), r))
    return facts[skip : skip + n], settings


def factworld_facts(model, n: int):
    from kvmem.core.facts import Fact
    from kvmem.factworld import shipped_world
    from kvmem.recall import fact_recall

    pool = [Fact(f.prompt, f.subject, target_true=f.target_true, relation_id=f.relation_id)
            for f in shipped_world().facts("train")[::7]]
    frame = fact_recall(model, pool, batch_size=16, progress=False).to_frame()
    return [(f, None) for f, ok in zip(pool, frame["rank"] == 0) if ok][:n]


# ---------------------------------------------------------------------------------------------


def ie_grid(trace):
    return [[round(float(v), 8) for v in row] for row in trace.indirect_effect]


def run_fact(model, fact, committed, cfgs, *, noise, samples, seed, window, time_exact: bool):
    import torch

    from kvmem.tracing.attribution import attribution_prepared
    from kvmem.tracing.trace import corrupted_run, prepare_fact, trace_prepared

    prepared = prepare_fact(model, fact, require_target=True)
    tf = prepared.tf
    rec = {"prompt": fact.prompt, "subject": fact.subject, "target": fact.target_true, "correct": prepared.correct,
           "str_tokens": list(tf.str_tokens), "subject_last": tf.subject.last, "p_clean": prepared.p_clean,
           "kinds": {}}
    if not prepared.correct:
        return rec
    for kind in KINDS:
        spec = [(kind, window, None)]
        k_rec = {}
        if committed is None or time_exact:
            t0 = time.perf_counter()
            (exact,) = trace_prepared(model, prepared, spec, noise=noise, samples=samples, seed=seed)
            k_rec["exact_seconds"] = round(time.perf_counter() - t0, 3)
            exact_ie = ie_grid(exact)
            p_corrupt = exact.p_corrupt
            if committed is not None:
                ref = torch.tensor(committed["scores"][kind]) - committed["p_corrupt"]
                k_rec["exact_max_diff"] = float((torch.tensor(exact_ie) - ref).abs().max())
        if committed is not None:
            p_corrupt = committed["p_corrupt"]
            exact_ie = [[round(v - p_corrupt, 8) for v in row] for row in committed["scores"][kind]]
        k_rec["exact"] = exact_ie
        k_rec["p_corrupt"] = p_corrupt
        k_rec["estimates"] = {}
        for method, k, scale in cfgs:
            t0 = time.perf_counter()
            base = corrupted_run(model, prepared, noise=noise, samples=samples, seed=seed)
            (est,) = attribution_prepared(model, prepared, spec, method=method, steps=k, base=base, noise=noise,
                                          samples=samples, seed=seed, scale=scale)
            seconds = time.perf_counter() - t0
            k_rec["estimates"][label(method, k, scale)] = {"seconds": round(seconds, 4), "ie": ie_grid(est)}
        rec["kinds"][kind] = k_rec
    return rec


def summarise(records, cfg_labels):
    rows = []
    per = {}
    for kind in KINDS:
        for lab in cfg_labels:
            stats = {"grid": [], "curve_subj": [], "curve_last": [], "peak_subj": [], "peak_last": [],
                     "near_subj": [], "near_last": [],
                     "top_subj": [], "top_last": [], "ratio": []}
            for r in records:
                k = r.get("kinds", {}).get(kind)
                if not k or lab not in k["estimates"]:
                    continue
                e = k["estimates"][lab]
                c = compare(k["exact"], e["ie"], r["subject_last"], len(r["str_tokens"]) - 1)
                for name in ("grid", "curve_subj", "curve_last", "peak_subj", "peak_last", "near_subj", "near_last",
                             "top_subj", "top_last"):
                    stats[name].append(c[name])
                if "exact_seconds" in k:
                    stats["ratio"].append(k["exact_seconds"] / e["seconds"])
            n = len(stats["grid"])
            if not n:
                continue

            def med(xs):
                xs = [x for x in xs if not math.isnan(x)]
                return statistics.median(xs) if xs else float("nan")

            s = {
                "n_facts": n,
                "median_grid_spearman": med(stats["grid"]),
                "median_curve_spearman_last_subject": med(stats["curve_subj"]),
                "median_curve_spearman_last_token": med(stats["curve_last"]),
                "peak_agree_last_subject": sum(stats["peak_subj"]) / n,
                "peak_agree_last_token": sum(stats["peak_last"]) / n,
                "near_peak_last_subject": sum(stats["near_subj"]) / n,
                "near_peak_last_token": sum(stats["near_last"]) / n,
                f"exact_peak_in_top{TOP}_last_subject": sum(stats["top_subj"]) / n,
                f"exact_peak_in_top{TOP}_last_token": sum(stats["top_last"]) / n,
                "n_timed": len(stats["ratio"]),
                "median_speedup": med(stats["ratio"]) if stats["ratio"] else float("nan"),
            }
            per[f"{kind} {lab}"] = s
            rows.append([kind, lab, n, f"{s['median_grid_spearman']:.3f}",
                         f"{s['median_curve_spearman_last_subject']:.3f}",
                         f"{s['median_curve_spearman_last_token']:.3f}",
                         f"{100 * s['peak_agree_last_subject']:.0f}%", f"{100 * s['peak_agree_last_token']:.0f}%",
                         f"{100 * s['near_peak_last_subject']:.0f}%", f"{100 * s['near_peak_last_token']:.0f}%",
                         f"{100 * s[f'exact_peak_in_top{TOP}_last_subject']:.0f}%",
                         f"{100 * s[f'exact_peak_in_top{TOP}_last_token']:.0f}%",
                         f"{s['median_speedup']:.3g}x ({s['n_timed']})"])
    return per, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="factworld", choices=["factworld", "gemma-3-270m"])
    ap.add_argument("--n-facts", type=int, default=100)
    ap.add_argument("--skip", type=int, default=20, help="gemma: facts of the committed AIE run skipped first")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="methods, 'name:prob' to linearise p instead of log p (default: atp atp:prob atp* "
                         "eap-ig ig on factworld, the same without ig on gemma)")
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--time-exact-every", type=int, default=1,
                    help="gemma: trace every N-th fact exactly again (timing, reproduction check)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--out-dir", default=str(results_dir("attribution")))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import kvmem
    from kvmem.core.fingerprint import model_fingerprint
    from kvmem.runs import RunLog
    from kvmem.tracing import fact_key, noise_level

    methods = args.methods or ["atp", "atp:prob", "atp*", "eap-ig"] + (["ig"] if args.model == "factworld" else [])
    cfgs = configs(methods, args.steps)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"attribution_{args.model}"
    model = kvmem.load_model(args.model)
    window = kvmem.config.trace_window(model.cfg.n_layers)
    if args.model == "factworld":
        facts = factworld_facts(model, args.n_facts)
        noise, samples, seed = noise_level(model, [f for f, _ in facts]), args.samples, 0
        source = "factworld train facts (every 7th) the model answers"
    else:
        facts, aie = gemma_facts(args.skip, args.n_facts)
        noise, samples, seed = aie["noise"], aie["samples"], aie["seed"]
        assert aie["window"] == window, "the committed AIE run's window differs"
        source = f"committed AIE run's facts {args.skip + 1}..{args.skip + len(facts)} (exact grids from its log)"
    settings = {"analysis": "attribution_vs_exact", "model": model_fingerprint(model), "kinds": list(KINDS),
                "window": window, "noise": float(noise), "samples": samples, "seed": seed,
                "configs": [label(*c) for c in cfgs], "threads": args.threads}
    log = RunLog(out / f"{stem}.jsonl", settings)
    done = log.records()
    if not args.summary_only:
        for i, (fact, committed) in enumerate(facts):
            key = fact_key(fact)
            if key in done:
                continue
            time_exact = committed is None or i % args.time_exact_every == 0
            t0 = time.perf_counter()
            rec = run_fact(model, fact, committed, cfgs, noise=noise, samples=samples, seed=seed, window=window,
                           time_exact=time_exact)
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            log.add(key, rec)
            done[key] = rec
            print(f"{i + 1}/{len(facts)} {fact.subject!r}: {rec['seconds']} s", flush=True)
    records = [done[fact_key(f)] for f, _ in facts if fact_key(f) in done]
    records = [r for r in records if r["correct"]]
    per, rows = summarise(records, [label(*c) for c in cfgs])
    diffs = [k["exact_max_diff"] for r in records for k in r["kinds"].values() if "exact_max_diff" in k]
    summary = {**provenance(__file__, argv, model.cfg.device), "model": args.model, "facts": source,
               "n_facts": len(records), "n_chosen": len(facts), "window": window, "noise": float(noise),
               "samples": samples, "seed": seed, "threads": args.threads, "results": per,
               "exact_reproduction_max_abs_diff": max(diffs) if diffs else None}
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    first = provenance_line(summary)
    if args.summary_only:
        first += " Summary of the run log, which the same command without --summary-only wrote (and resumes)."
    lines = [first, "",
             f"{len(records)} facts ({source}; {len(facts)} chosen), kinds mlp and attn, window {window}, "
             f"{samples} noise samples, noise {noise:.4g}, seed {seed}, {args.threads} thread(s). "
             "Spearman: of the indirect effects, exact vs estimate; peak: the same argmax layer; near peak: the "
             f"exact effect at the estimate's peak layer is at least {NEAR:.0%} of the exact curve's maximum (window-"
             f"{window} curves are often plateaus whose argmax is decided by noise); peak in top {TOP}: the exact "
             f"peak layer is among the estimate's {TOP} highest layers (so {TOP} exact cells per column find it); "
             "speed-up: "
             "exact seconds / estimate seconds on the same fact, kind and cells (median over the facts timed, "
             "their number in brackets).", ""]
    if diffs:
        lines += [f"Exact traces rerun on {len(diffs)} (fact, kind) pairs reproduce the committed grids to "
                  f"{max(diffs):.2g} (max abs difference of an indirect effect).", ""]
    lines.append(table(["kind", "method", "facts", "median grid Spearman", "median curve Spearman (last subj.)",
                        "median curve Spearman (last token)", "same peak (last subj.)", "same peak (last token)",
                        "near peak (last subj.)", "near peak (last token)",
                        f"peak in top {TOP} (last subj.)", f"peak in top {TOP} (last token)", "median speed-up"], rows))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
