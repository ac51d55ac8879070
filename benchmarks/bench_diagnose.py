"""Does localization predict safe editing? `kvmem.pipelines.diagnose` per fact, then ROME at the diagnosed
layer and at a fixed layer, each edit alone.

    python benchmarks/bench_diagnose.py --model factworld --n-facts 100
    python benchmarks/bench_diagnose.py --model gemma-3-270m --n-facts 100 --source pararel

Per fact: the diagnostic (causal-trace MLP effect by layer at the last subject token, memory view,
knowledge neurons over the paraphrases; localization score S = sqrt(concentration × Jaccard)),
then two single edits (restored after each): at `peak_layer` and at the fixed layer (factworld: 1,
the ~30% depth heuristic; else the model's ROME preset). Outcomes (kvmem.evaluation.record_metrics):
ES/EM on the prompt, PS/PM on the paraphrases, NS/NM on neighbourhood prompts (other subjects
with the same relation and object), and the drop in top-1 accuracy on unrelated known facts.

An edit is called SAFE when ES = 1, PS ≥ 0.5, NS falls by at most 0.1 and unrelated accuracy by at
most 0.05. Reported: Spearman ρ of the score (and its parts) with each outcome, with 95%
percentile bootstrap CIs (2,000 resamples of facts); for the criterion "S ≥ τ" at τ = the 25/50/75%
score quantiles, how many facts pass and the false-safe rate P(unsafe | S ≥ τ) next to the base rate.

Facts on factworld: `kvmem.factworld.counterfact_records(n_neighbours=10, seed=--seed)` (the facts
sampled and each new object drawn with the seed; paraphrases the held-out templates): the first
`--n-facts` are diagnosed, the last `--n-unrelated` are the unrelated facts; C from
`kvmem.factworld.corpus()`.

Facts for a model other than factworld: `--source counterfact` takes the CounterFact dev records
(Gemma-3-270m answers only ~7% of them top-1, and diagnose skips facts the model does not know);
`--source pararel` builds CounterFact-style records from PARAREL facts the model knows
(kvmem.data.pararel_counterfact: the prompt and at least one paraphrase answered top-1; target_new
another object of the relation; neighbours: other subjects with the same relation and object).

Per-fact rows go to a run log (kvmem.runs.RunLog: a settings header, one line per fact) as they are
computed; a rerun resumes, a rerun with other settings is refused (--restart starts over).
Results: benchmarks/results/diagnose/diagnose_<model>[_pararel].json/.md/.csv/.png. The evaluation
data is read from --data (else $KVMEM_DATA, else ../shared/data beside the repository).

On Ray workers (docs/scaling.md): `--executor ray` (`--address`, `--workers`, `--gpus-per-worker`)
diagnoses the facts on workers that each load the model once, into the same run log.
Splitting a run by hand where Ray cannot be installed: `--shard I/N` diagnoses every N-th fact into
diagnose_<model>.shardIofN.jsonl (no summary); `--merge N` joins the shard logs into the run's
log and summarises the facts in it (as --logged-only). --device cuda runs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from functools import partial
from pathlib import Path

from common import (RunPlan, add_data_arguments, add_run_arguments, bootstrap_ci, check_run_arguments, data_file, data_name, peak_rss_mb,
                    provenance, provenance_line, results_dir)

OUTCOMES = ("ES", "EM", "PS", "PM", "NS", "NM", "ns_drop", "unrelated_drop")
PREDICTORS = ("score", "concentration", "jaccard", "peak_share", "agreement")


# factworld's records, one definition (kvmem.factworld.counterfact_records), with this many neighbours
FACTWORLD_NEIGHBOURS = 10


def factworld_cases(args):
    """The world's CounterFact records shuffled (seeded): the first n_facts to diagnose and edit, the
    last n_unrelated as unrelated facts; C over the world's own text; fixed layer 1."""
    from kvmem.core.facts import Fact
    from kvmem.factworld import corpus, counterfact_records

    records = counterfact_records(n_neighbours=FACTWORLD_NEIGHBOURS, seed=args.seed)
    unrelated = [Fact(r.request.prompt, r.subject, target_true=r.request.target_true, relation_id=r.request.relation_id)
                 for r in records[-args.n_unrelated:]]
    return records[: args.n_facts], unrelated, corpus(), 1


def known_unrelated(model, args):
    from kvmem.data import load_known_facts
    from kvmem.recall import answered_facts

    return answered_facts(model, load_known_facts(data_file(args, "known"))[: 4 * args.n_unrelated])[: args.n_unrelated]


def counterfact_cases(model, args):
    from kvmem.data import load_counterfact
    from kvmem.editing import rome_hparams

    cases = load_counterfact(data_file(args, "counterfact"))[: args.n_facts]
    return cases, known_unrelated(model, args), data_file(args, "corpus"), rome_hparams(model).layer


# many-to-many relations (borders, diplomatic relations, twin cities): "the" answer is one of many
PARAREL_SKIP = ("P47", "P530", "P190")


def pararel_cases(model, args):
    """CounterFact-style records from PARAREL facts the model knows (kvmem.data.pararel_counterfact):
    relations taken in turn, bags shuffled (seeded); a record is used when the model answers its
    prompt and at least one paraphrase top-1 and it has ≥ 3 neighbourhood prompts."""
    import dataclasses
    import itertools

    from kvmem.data import load_pararel, pararel_counterfact
    from kvmem.editing import rome_hparams
    from kvmem.core.facts import Fact
    from kvmem.recall import fact_recall

    bags = [b for b in load_pararel(data_file(args, "pararel"), min_prompts=3) if b.relation not in PARAREL_SKIP]
    by_rel: dict[str, list] = {}
    for r in pararel_counterfact(bags, seed=args.seed):
        if len(r.neighborhood_prompts) >= 3:
            by_rel.setdefault(r.request.relation_id, []).append(r)
    rng = random.Random(args.seed)
    for rs in by_rel.values():
        rng.shuffle(rs)
    order = [r for group in itertools.zip_longest(*by_rel.values()) for r in group if r is not None]
    cases, scanned = [], 0
    args.scan_index = {}  # case_id -> position in the scan order, logged with the fact
    for i in range(0, min(len(order), args.max_scan), 64):
        if len(cases) >= args.n_facts:
            break
        chunk = order[i : min(i + 64, args.max_scan)]
        facts = [f for r in chunk for f in [r.request] + [Fact(p, r.subject, target_true=r.request.target_true)
                                                          for p in r.paraphrase_prompts]]
        known = iter(fact_recall(model, facts, batch_size=32).known.tolist())
        for r in chunk:
            k = [next(known) for _ in range(1 + len(r.paraphrase_prompts))]
            if k[0] and any(k[1:]) and len(cases) < args.n_facts:
                # paraphrases the model answers first, so --max-paraphrases keeps usable ones (PS uses all)
                perm = sorted(range(len(r.paraphrase_prompts)), key=lambda j: not k[1 + j])
                cases.append(dataclasses.replace(r, paraphrase_prompts=tuple(r.paraphrase_prompts[j] for j in perm)))
                args.scan_index[r.case_id] = i + chunk.index(r)
        scanned += len(chunk)
    print(f"PARAREL: {len(cases)} known facts from {scanned} scanned records of {len(by_rel)} relations", flush=True)
    args.pararel_scanned = scanned
    return cases, known_unrelated(model, args), data_file(args, "corpus"), rome_hparams(model).layer


# --- statistics ----------------------------------------------------------------------------

def ranks(x):
    import pandas as pd

    return pd.Series(x).rank(method="average").to_numpy()


def spearman(x, y) -> float:
    import numpy as np

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_ci(x, y, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """95% percentile CI of Spearman's ρ over `n` resamples of the (x, y) pairs, and the share of
    resamples where ρ is defined (a resample of a nearly constant outcome can be constant; those are
    left out, which makes the CI unreliable when the share is low)."""
    import numpy as np

    ci = bootstrap_ci(spearman, np.asarray(x, float), np.asarray(y, float), n=n, seed=seed)
    return ci.lo, ci.hi, ci.defined


# --- one fact ------------------------------------------------------------------------------

def diagnose_state(model, corpus, n_tok) -> tuple:
    """A worker's state: its model and its statistics per layer, computed (or read from kvmem's
    cache) when a fact first needs them."""
    from kvmem.editing import second_moment

    memo = {}

    def stats_for(layer):
        if layer not in memo:
            memo[layer] = second_moment(model, layer, corpus, n_tokens=n_tok, progress=False)
        return memo[layer]

    return model, stats_for


def diagnose_case(unrelated, hp, prefixes, fixed, args, state, case) -> dict:
    """One fact's logged row (`run_case`), with the device it ran on."""
    import torch

    model, stats_for = state
    r = run_case(model, case, unrelated, stats_for, hp, prefixes, fixed, args)
    r["fixed_layer"] = fixed
    r["device"] = (torch.cuda.get_device_name(model.cfg.device) if str(model.cfg.device).startswith("cuda")
                   else f"cpu ({platform.machine()})")  # a merged log can hold rows from several machines
    if args.source == "pararel" and args.model != "factworld":
        r["scan_index"] = args.scan_index[case.case_id]
    return r


def run_case(model, case, unrelated, stats_for, hp, prefixes, fixed_layer, args) -> dict:
    import kvmem
    from kvmem.editing import compute_rome_edit, edited
    from kvmem.errors import KvmemError, UnknownFactError
    from kvmem.evaluation import record_metrics
    from kvmem.pipelines.diagnose import diagnose
    from kvmem.recall import fact_recall

    req = case.request
    fact = kvmem.Fact(req.prompt, req.subject, target_true=req.target_true, relation_id=req.relation_id)
    row = {"case_id": case.case_id, "subject": req.subject, "prompt": req.prompt, "target_true": req.target_true,
           "target_new": req.target_new}
    t = time.perf_counter()
    try:
        paraphrases = list(case.paraphrase_prompts)[: args.max_paraphrases]
        loc = diagnose(model, fact, paraphrases, samples=args.samples, steps=args.ig_steps, progress=False)
    except UnknownFactError as e:
        row.update(unknown=True, error=str(e))
        return row
    row.update(unknown=False, diagnose_s=time.perf_counter() - t, **{k: v for k, v in loc.summary().items()
                                                                      if k not in row})
    row["layer_share"] = [float(x) for x in loc.layer_share]
    base = record_metrics(model, case, generation=False)
    acc0 = fact_recall(model, unrelated).top_k(1)
    row.update({f"unedited_{k}": v for k, v in base.items() if k != "GE"}, unrelated_acc0=acc0)
    layers = {"diagnosed": loc.peak_layer, "fixed": fixed_layer}
    for cond, layer in layers.items():
        if layer < 0:
            row[f"{cond}_error"] = "no causal effect: no diagnosed layer"
            continue
        if cond == "fixed" and layer == layers["diagnosed"] and "diagnosed_ES" in row:
            row.update({k.replace("diagnosed_", "fixed_"): v for k, v in list(row.items()) if k.startswith("diagnosed_")})
            continue
        try:
            e = compute_rome_edit(model, req, layer=layer, stats=stats_for(layer), hparams=hp, prefixes=prefixes)
        except KvmemError as err:
            row[f"{cond}_error"] = f"{type(err).__name__}: {err}"
            continue
        with edited(model, e, check=False):
            m = record_metrics(model, case, generation=False)
            acc = fact_recall(model, unrelated).top_k(1)
        m.pop("GE", None)
        m["ns_drop"] = base["NS"] - m["NS"]
        m["unrelated_drop"] = acc0 - acc
        m["layer"] = layer
        m["edit_s"] = e.seconds
        m["safe"] = bool(m["ES"] == 1.0 and m["PS"] >= 0.5 and m["ns_drop"] <= 0.1 and m["unrelated_drop"] <= 0.05)
        row.update({f"{cond}_{k}": v for k, v in m.items()})
    row["total_s"] = time.perf_counter() - t
    return row


# --- analysis ------------------------------------------------------------------------------

def analyse(df, args) -> dict:
    import numpy as np
    import pandas as pd

    if "diagnosed_ES" not in df:  # no fact the model knows got as far as an edit
        return {"n_facts": int(len(df)), "n_unknown": int(df["unknown"].sum()), "n_used": 0,
                "diagnosed_equals_fixed": float("nan"), "peak_layer_counts": {}, "means": {},
                "spearman": [], "criterion": []}
    ok = df[(~df["unknown"]) & df["diagnosed_ES"].notna()].copy()
    out = {"n_facts": int(len(df)), "n_unknown": int(df["unknown"].sum()), "n_used": int(len(ok)),
           "diagnosed_equals_fixed": float((ok["peak_layer"] == ok["fixed_layer"]).mean()) if len(ok) else float("nan"),
           "peak_layer_counts": {str(k): int(v) for k, v in ok["peak_layer"].value_counts().sort_index().items()}}
    means = {}
    for cond in ("diagnosed", "fixed"):
        means[cond] = {k: float(ok[f"{cond}_{k}"].mean()) for k in OUTCOMES if f"{cond}_{k}" in ok}
        means[cond]["safe"] = float(ok[f"{cond}_safe"].astype(float).mean())
    means["unedited"] = {k: float(ok[f"unedited_{k}"].mean()) for k in ("ES", "EM", "PS", "PM", "NS", "NM")}
    out["means"] = means
    out["paired"] = paired_differences(ok, args.bootstrap, args.seed)
    if len(ok) < 3:  # too few facts the model knows: nothing to correlate
        out.update(spearman=[], criterion=[])
        return out
    corr = []
    for pred in PREDICTORS:
        for cond in ("diagnosed", "fixed"):
            for o in OUTCOMES + ("safe",):
                col = f"{cond}_{o}"
                if col not in ok:
                    continue
                x, y = ok[pred].to_numpy(float), ok[col].astype(float).to_numpy()
                rho = spearman(x, y)
                lo, hi, frac = spearman_ci(x, y, args.bootstrap, args.seed) if rho == rho else (float("nan"),) * 3
                counts = pd.Series(y).value_counts()  # NaN outcomes (e.g. no unrelated facts) are not counted
                n_minority = int(len(y) - counts.iloc[0]) if len(counts) else 0
                corr.append({"predictor": pred, "condition": cond, "outcome": o, "rho": rho, "ci_lo": lo, "ci_hi": hi,
                             "boot_defined": frac, "n_off_mode": n_minority, "n": int(len(x))})
    out["spearman"] = corr
    crit = []
    for cond in ("diagnosed", "fixed"):
        unsafe = ~ok[f"{cond}_safe"].astype(bool)
        for q in (0.25, 0.5, 0.75):
            tau = float(np.quantile(ok["score"], q))
            passing = ok["score"] >= tau
            crit.append({"condition": cond, "quantile": q, "tau": tau, "n_pass": int(passing.sum()),
                         "false_safe_rate": float(unsafe[passing].mean()) if passing.any() else float("nan"),
                         "unsafe_rate_below": float(unsafe[~passing].mean()) if (~passing).any() else float("nan"),
                         "base_unsafe_rate": float(unsafe.mean())})
    out["criterion"] = crit
    return out


def paired_differences(ok, n_boot: int, seed: int) -> list[dict]:
    """Editing at the diagnosed layer minus at the fixed layer, fact by fact: the mean difference of
    each outcome with a 95% bootstrap CI over facts (facts whose diagnosed layer is the fixed one
    count as 0)."""
    import numpy as np

    rng = np.random.default_rng(seed)  # one stream, drawn from outcome after outcome
    out = []
    for o in OUTCOMES + ("safe",):
        a, b = f"diagnosed_{o}", f"fixed_{o}"
        if a not in ok or b not in ok:
            continue
        d = (ok[a].astype(float) - ok[b].astype(float)).dropna().to_numpy()
        if not len(d):
            continue
        ci = bootstrap_ci(np.mean, d, n=n_boot, rng=rng) if n_boot and len(d) > 1 else None
        lo, hi = (ci.lo, ci.hi) if ci is not None else (np.nan, np.nan)
        out.append({"outcome": o, "mean_diff": float(d.mean()), "ci_lo": float(lo), "ci_hi": float(hi), "n": int(len(d)),
                    "n_better": int((d > 0).sum()), "n_worse": int((d < 0).sum())})
    return out


def _cell(c) -> str:
    flag = "†" if c["boot_defined"] < 0.95 or c["n_off_mode"] < 5 else ""
    return f"{c['rho']:+.2f} [{c['ci_lo']:+.2f}, {c['ci_hi']:+.2f}]{flag}"


def markdown(meta, res) -> str:
    L = [f"# Does localization predict safe editing? ({meta['model']})", "",
         f"{provenance_line(meta)} {meta['compute_s']:.0f} s of diagnose + edits + evaluation, "
         f"{meta['compute_s'] / max(res['n_facts'], 1):.1f} s per fact; this invocation {meta['wall_s']:.0f} s, "
         f"{meta['resumed']} facts read back from the log"
         + (f"; rows computed on: {', '.join(f'{k} {v}' for k, v in meta['devices'].items())}" if meta.get("devices") else "")
         + f". {res['n_facts']} facts from {meta['source']}; "
         f"{res['n_unknown']} unknown to the model (diagnose raised UnknownFactError, skipped); {res['n_used']} used. "
         f"Fixed layer {meta['fixed_layer']}; diagnosed layer = causal-tracing MLP peak at the last subject token "
         f"(counts: {res['peak_layer_counts']}; equal to the fixed layer for {res['diagnosed_equals_fixed']:.0%}). "
         f"Diagnose: {meta['samples']} noise samples, {meta['ig_steps']} IG steps"
         + (f", at most {meta['max_paraphrases']} paraphrases per fact" if meta.get("max_paraphrases") else "")
         + f"; edits: contexts {meta['prefixes']}.", "",
         "Score S = sqrt((1 − H(p)/log L) × mean pairwise Jaccard of the paraphrases' knowledge-neuron sets), "
         "p = positive single-layer MLP indirect effect by layer at the last subject token, normalised.", "",
         "## Mean outcomes", "", "| condition | " + " | ".join(OUTCOMES) + " | safe |", "|---" * (len(OUTCOMES) + 2) + "|"]
    for cond, m in res["means"].items():
        L.append(f"| {cond} | " + " | ".join(f"{m[k]:.3f}" if k in m else "" for k in OUTCOMES)
                 + f" | {m.get('safe', float('nan')):.3f} |")
    L += ["", "SAFE = ES = 1, PS ≥ 0.5, NS drop ≤ 0.1, unrelated-accuracy drop ≤ 0.05.", ""]
    if res.get("paired"):
        L += ["Paired, fact by fact: edit at the diagnosed layer minus at the fixed layer (mean, 95% bootstrap CI; "
              "facts where it is higher / lower):", "", "| outcome | diagnosed − fixed | higher | lower |", "|---|---|---|---|"]
        L += [f"| {c['outcome']} | {c['mean_diff']:+.3f} [{c['ci_lo']:+.3f}, {c['ci_hi']:+.3f}] | {c['n_better']} | {c['n_worse']} |"
              for c in res["paired"]]
        L += [""]
    L += ["## Spearman ρ of the localization score with each outcome (95% bootstrap CI)", "",
          "| outcome | at diagnosed layer | at fixed layer |", "|---|---|---|"]
    sc = [c for c in res["spearman"] if c["predictor"] == "score"]
    for o in OUTCOMES + ("safe",):
        cells = []
        for cond in ("diagnosed", "fixed"):
            c = next((c for c in sc if c["condition"] == cond and c["outcome"] == o), None)
            cells.append("n/a (constant)" if c is None or c["rho"] != c["rho"] else _cell(c))
        L.append(f"| {o} | " + " | ".join(cells) + " |")
    L += ["", "† the outcome is nearly constant (fewer than 5 facts differ from its most common value, or ρ is "
          "undefined in more than 5% of the bootstrap resamples): that ρ and its CI rest on a handful of facts.", ""]
    L += ["", "The parts of the score against the diagnosed-layer outcomes (ρ [CI]):", "",
          "| predictor | " + " | ".join(OUTCOMES + ("safe",)) + " |", "|---" * (len(OUTCOMES) + 2) + "|"]
    for pred in PREDICTORS:
        cells = []
        for o in OUTCOMES + ("safe",):
            c = next((c for c in res["spearman"] if c["predictor"] == pred and c["condition"] == "diagnosed"
                      and c["outcome"] == o), None)
            cells.append("n/a" if c is None or c["rho"] != c["rho"] else _cell(c))
        L.append(f"| {pred} | " + " | ".join(cells) + " |")
    L += ["", "## Criterion \"S ≥ τ: localized enough to edit here\"", "",
          "| edit layer | τ (score quantile) | facts passing | false-safe rate P(unsafe given S ≥ τ) | unsafe rate below τ | base unsafe rate |",
          "|---|---|---|---|---|---|"]
    for c in res["criterion"]:
        L.append(f"| {c['condition']} | {c['tau']:.3f} (q{int(c['quantile'] * 100)}) | {c['n_pass']} | {c['false_safe_rate']:.3f} | "
                 f"{c['unsafe_rate_below']:.3f} | {c['base_unsafe_rate']:.3f} |")
    L += ["", meta.get("verdict", ""), "", f"Per-fact rows: `{meta['csv']}`; figure: `{meta['png']}`.", ""]
    return "\n".join(L)


def verdict(res, cond: str = "diagnosed") -> str:
    c = [x for x in res["spearman"] if x["predictor"] == "score" and x["condition"] == cond and x["outcome"] == "safe"]
    crit = [x for x in res["criterion"] if x["condition"] == cond]
    base = crit[0]["base_unsafe_rate"] if crit else float("nan")
    best = min(crit, key=lambda x: x["false_safe_rate"]) if crit else None
    if res["n_used"] < 3:
        return f"Verdict ({cond} layer): only {res['n_used']} facts the model knows; nothing can be tested on them."
    if not c or c[0]["rho"] != c[0]["rho"]:
        return (f"Verdict ({cond} layer): the outcome 'safe' is constant over these facts "
                f"(unsafe rate {base:.1%}), so no criterion can be tested on them.")
    rho, lo, hi = c[0]["rho"], c[0]["ci_lo"], c[0]["ci_hi"]
    sig = lo > 0 or hi < 0
    usable = sig and rho > 0 and best is not None and best["false_safe_rate"] < base
    return (f"Verdict ({cond} layer): ρ(score, safe) = {rho:+.2f} [{lo:+.2f}, {hi:+.2f}]; "
            + ("the CI excludes 0. " if sig else "the CI includes 0. ")
            + ("ρ is negative: the more localized a fact, the LESS safe an edit at this layer (its recall sits "
               "elsewhere). " if sig and rho < 0 else "")
            + (f"A usable criterion emerges: S ≥ {best['tau']:.3f} has a false-safe rate of {best['false_safe_rate']:.1%} "
               f"against a base unsafe rate of {base:.1%}." if usable else
               f"No usable criterion emerges here: the best threshold (S ≥ {best['tau']:.3f}) still has a false-safe rate "
               f"of {best['false_safe_rate']:.1%} against a base unsafe rate of {base:.1%}."))


def run_settings(args, fixed_layer: int) -> dict:
    """What a logged row depends on: a log started with other settings is refused, not mixed."""
    factworld = args.model == "factworld"
    return {"model": args.model, "source": "factworld" if factworld else args.source,
            "data": None if factworld else data_name(args, args.source),
            "known": None if factworld else data_name(args, "known"),
            "corpus": None if factworld else data_name(args, "corpus"),
            "n_unrelated": args.n_unrelated, "fixed_layer": fixed_layer, "samples": args.samples,
            "ig_steps": args.ig_steps, "prefixes": args.prefixes, "stats_tokens": args.stats_tokens, "seed": args.seed,
            **({"max_paraphrases": args.max_paraphrases} if args.max_paraphrases is not None else {})}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="factworld")
    ap.add_argument("--n-facts", type=int, default=100)
    ap.add_argument("--n-unrelated", type=int, default=50)
    ap.add_argument("--fixed-layer", type=int, default=None)
    ap.add_argument("--samples", type=int, default=10, help="causal-tracing noise samples")
    ap.add_argument("--ig-steps", type=int, default=20)
    ap.add_argument("--max-paraphrases", type=int, default=None,
                    help="paraphrases diagnose uses per fact (default all; PS is scored on all of them)")
    ap.add_argument("--prefixes", default="5x5,10x5")
    ap.add_argument("--stats-tokens", type=int, default=None)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--source", choices=("counterfact", "pararel"), default="counterfact",
                    help="facts for a model other than factworld: CounterFact records (dev 250), or CounterFact-style "
                         "records built from PARAREL facts the model knows (more known facts, paraphrases from PARAREL)")
    ap.add_argument("--max-scan", type=int, default=6000, help="--source pararel: records checked for known facts at most")
    add_data_arguments(ap, "counterfact", "pararel", "known", "corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output prefix (default benchmarks/results/diagnose/diagnose_<model>[_pararel])")
    ap.add_argument("--quiet", action="store_true")
    add_run_arguments(ap, "facts")
    from kvmem.cli.runtime import add_executor_options

    add_executor_options(ap)  # --executor ray: facts on Ray workers (docs/scaling.md)
    args = ap.parse_args(argv)
    if args.shard and args.executor != "serial":
        ap.error("--shard splits a run by hand; with --executor ray one run covers every fact")
    suffix = "_pararel" if args.source == "pararel" and args.model != "factworld" else ""
    out = Path(args.out or results_dir("diagnose") / f"diagnose_{args.model.replace('/', '_')}{suffix}")
    check_run_arguments(ap, args)
    plan = RunPlan.from_args(args, f"{out}.jsonl")
    if args.max_paraphrases is not None and args.max_paraphrases < 1:
        ap.error("--max-paraphrases must be at least 1")
    if args.max_scan < 1:
        ap.error("--max-scan must be at least 1")

    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    import kvmem
    from kvmem.editing import RomeHparams, context_prefixes, rome_hparams, second_moment

    from kvmem.cli import runtime
    from kvmem.executors import Work, model_setup, run_items
    from kvmem.runs import RunLog

    t0 = time.perf_counter()
    model = kvmem.load_model(args.model, device=args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    if args.model == "factworld":
        cases, unrelated, corpus, fixed = factworld_cases(args)
        source, base_hp = "factworld (paraphrases: held-out templates; neighbours: same relation and object)", RomeHparams()
    elif args.source == "pararel":
        if plan.summarising:  # summarise what the computing runs selected and logged
            cases, unrelated, corpus, fixed = None, [], None, rome_hparams(model).layer
        else:
            cases, unrelated, corpus, fixed = pararel_cases(model, args)
        source = (f"{data_name(args, 'pararel')} (CounterFact-style: known facts, relations taken in turn, "
                  "{scanned} records scanned; paraphrases: the bag's other prompts; neighbours: "
                  "same relation and object; skipped many-to-many " + ", ".join(PARAREL_SKIP) + ")")
        base_hp = rome_hparams(model)
    else:
        cases, unrelated, corpus, fixed = counterfact_cases(model, args)
        source, base_hp = data_name(args, "counterfact"), rome_hparams(model)
    if cases is not None and not cases:
        raise SystemExit(f"bench_diagnose: no facts to diagnose from {source} (with --source pararel: the model "
                         "answers none of the scanned PARAREL facts top-1); nothing written.")
    fixed = args.fixed_layer if args.fixed_layer is not None else fixed
    prefixes_spec = tuple(tuple(int(x) for x in p.split("x")) for p in args.prefixes.split(","))
    hp = RomeHparams(**{**base_hp.__dict__, "layer": fixed, "prefixes": prefixes_spec})
    prefixes = context_prefixes(model, hp)
    n_tok = args.stats_tokens or max(20_000, 50 * int(model.cfg.d_mlp))
    _, stats_for = diagnose_state(model, corpus, n_tok)

    settings = run_settings(args, fixed)
    plan.merge_shards("facts")  # a fact in two logs keeps its first row
    # summarising: every logged fact, whatever the case list would be now
    cases = [] if plan.summarising else plan.select(cases, lambda c: str(c.case_id))
    log = RunLog(plan.write_log, settings, restart=args.restart)
    resumed = sum(str(c.case_id) in log for c in cases)
    # one fact per item, on --executor: serially on this model, or on Ray workers that load it once
    executor = runtime.executor(args)
    work = Work(model_setup(model, executor, diagnose_state, corpus, n_tok),
                partial(diagnose_case, unrelated, hp, prefixes, fixed, args), local=(model, stats_for))
    bar = tqdm(total=len(cases), initial=resumed, disable=args.quiet, desc="diagnose + edit")
    try:
        run_items([(str(c.case_id), c) for c in cases], work, log=log, executor=executor,
                  on_done=lambda _: bar.update())
    finally:
        bar.close()
    logged = log.records()
    rows = list(logged.values()) if plan.summarising else [logged[str(c.case_id)] for c in cases]
    if plan.summarising:
        resumed = len(rows)
    if "{scanned}" in source:  # the PARAREL records looked at, up to the last fact logged
        source = source.format(scanned=1 + max((r.get("scan_index", -1) for r in rows), default=-1))
    if plan.shard is not None:
        print(f"shard {args.shard}: {len(rows)} facts in {plan.write_log}", flush=True)
        return
    df = pd.DataFrame(rows)
    res = analyse(df, args)
    res["fixed_layer"] = fixed
    meta = {**provenance(__file__, argv, model.cfg.device), "argv": sys.argv[1:] if argv is None else argv,
            "model": args.model, "source": source,
            "fixed_layer": fixed, "samples": args.samples, "ig_steps": args.ig_steps, "prefixes": prefixes_spec,
            "max_paraphrases": args.max_paraphrases,
            "gpu": f", GPU {torch.cuda.get_device_name()}" if str(model.cfg.device).startswith("cuda") else "",
            "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
            "csv": f"{out.name}.csv", "png": f"{out.name}.png", "resumed": resumed,
            "devices": (df["device"] if "device" in df else pd.Series(index=df.index, dtype=object))
            .fillna("not recorded").value_counts().to_dict(),
            "compute_s": float(df["total_s"].fillna(0).sum()) if "total_s" in df else float("nan")}
    meta["verdict"] = verdict(res, "diagnosed") + "\n\n" + verdict(res, "fixed")
    df.drop(columns=["layer_share"], errors="ignore").to_csv(f"{out}.csv", index=False)
    Path(f"{out}.json").write_text(json.dumps({**meta, "results": res}, indent=1, default=str))
    Path(f"{out}.md").write_text(markdown(meta, res))
    figure(df, f"{out}.png")
    print(Path(f"{out}.md").read_text())


def figure(df, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "diagnosed_ES" not in df:
        return
    ok = df[(~df["unknown"]) & df["diagnosed_ES"].notna()]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, o in zip(axes, ("PS", "ns_drop", "unrelated_drop", "EM")):
        for cond, mk in (("diagnosed", "o"), ("fixed", "x")):
            ax.scatter(ok["score"], ok[f"{cond}_{o}"], s=12, marker=mk, alpha=0.6, label=f"{cond} layer")
        ax.set_xlabel("localization score S")
        ax.set_title(o, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
