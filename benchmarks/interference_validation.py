"""Does `kvmem.predict_interference` predict the neighbourhood damage of ROME edits?

    python benchmarks/interference_validation.py --model factworld --source diagnose --threads 1
    python benchmarks/interference_validation.py --model gemma-3-270m --source counterfact --n-records 250 --threads 1
    python benchmarks/interference_validation.py --model gemma-3-270m --source diagnose --diagnose-layers fixed --threads 1
    python benchmarks/interference_validation.py --model smollm2-135m --source counterfact --n-records 100 --threads 1

Per record and condition, the edit is computed (k*, v*: ROME with the model's preset, C over
200k tokens of the corpus, as `bench_editing.py` / `bench_diagnose.py`), then BEFORE applying it
`predict_interference` gives the risk (the predicted share of neighbourhood prompts the model gets
right whose margin log p(true) − log p(new) the edit turns, first order through the network), the
largest λ over the neighbour prompts' keys, known-fact flips and λ over corpus keys; then the edit is
applied (`edited`) and ES/PS/NS measured (`record_metrics`). Conditions: "C" = ROME's edit; "no C" =
the same k* → v* inserted with u = k* (no covariance: `reinsert(model, edit, None)`), an edit whose
neighbourhood damage is known to be large, so that both kinds of outcome occur.

Sources: "counterfact" = the first --n-records records of the CounterFact file at the preset's layer
(the committed `editing_gemma250` per-record NS is kept beside the remeasured one as a check);
"diagnose" = the facts of the committed `bench_diagnose` run of the model (its localization score
in the same row), each at its fixed and its diagnosed layer.

Per-record rows go to PREFIX.jsonl (kvmem.runs.RunLog; rerun the same command to resume);
`--logged-only` rewrites PREFIX.json/.md from the log; `--shard I/N` computes every N-th record
into its own log and `--merge N` joins the shard logs into PREFIX.jsonl and summarises (two shards
keep both cores of a 2-core machine busy). Default PREFIX:
benchmarks/results/interference/interference_<model>_<source>.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from common import (RunPlan, add_data_arguments, add_run_arguments, bootstrap_ci, check_run_arguments, data_file, data_name,
                    provenance, provenance_line, results_dir)
from kvmem.editing.interference import RISK_THRESHOLD

OUTCOME = "ns_drop"  # NS before − NS after (share of neighbour prompts); "drops" = > 0


# --- cases -----------------------------------------------------------------------------------

def diagnose_cases(model_name: str, args, kinds=("fixed", "diagnosed")):
    """(record, [(layer name, layer)], localization row) for each fact of the committed diagnose run;
    `kinds`: which of its layers ("fixed": the preset's, "diagnosed": the tracing peak)."""
    log = Path(args.diagnose_log or results_dir("diagnose") / (
        "diagnose_factworld.jsonl" if model_name == "factworld" else f"diagnose_{model_name}_pararel.jsonl"))
    rows = [json.loads(l)["record"] for l in log.read_text().splitlines()[1:]]
    rows = [r for r in rows if not r.get("unknown")]
    if model_name == "factworld":
        from kvmem.factworld import counterfact_records

        recs = {str(r.case_id): r for r in counterfact_records(n_neighbours=10, seed=0)}
    else:
        from kvmem.data import load_pararel, pararel_counterfact

        bags = load_pararel(data_file(args, "pararel"), min_prompts=3)
        recs = {str(r.case_id): r for r in pararel_counterfact(bags, seed=0)}
    out = []
    for r in rows:
        rec = recs[str(r["case_id"])]
        assert rec.request.prompt == r["prompt"] and rec.request.target_new.strip() == r["target_new"].strip(), r["case_id"]
        layers = [(k, r[f"{k}_layer"]) for k in kinds]
        out.append((rec, layers, r))
    return out, str(log)


def counterfact_cases(model, args):
    from kvmem.data import load_counterfact
    from kvmem.editing import rome_hparams

    recs = load_counterfact(data_file(args, "counterfact"), limit=args.n_records)
    committed = {}
    path = Path(args.committed or results_dir("editing") / "editing_gemma250_gemma-3-270m_records.jsonl")
    if args.model == "gemma-3-270m" and path.exists():
        for line in path.read_text().splitlines()[1:]:
            d = json.loads(line)
            for row in d["record"]["rows"]:
                committed.setdefault(str(row["case_id"]), {})[row["condition"]] = row
    layer = rome_hparams(model).layer
    return [(r, [("preset", layer)], committed.get(str(r.case_id))) for r in recs], str(path) if committed else None


# --- one record ----------------------------------------------------------------------------------

def run_record(model, rec, layers, extra, stats_for, prefixes, known, corpus, args) -> dict:
    from kvmem.editing import compute_rome_edit, edited, reinsert, rome_hparams
    from kvmem.editing.interference import predict_interference
    from kvmem.errors import AlreadySatisfiedError
    from kvmem.evaluation import record_metrics

    hp = rome_hparams(model)
    if args.model == "factworld":
        hp = dataclasses.replace(hp, prefixes=((5, 5), (10, 5)))
    base = record_metrics(model, rec, generation=False)
    out = {"case_id": rec.case_id, "subject": rec.subject, "unedited": base, "conditions": {}}
    if extra and "score" in extra:  # the diagnose run's localization
        out["localization"] = {k: extra[k] for k in ("score", "concentration", "jaccard", "peak_share", "peak_layer")}
        out["committed"] = {c: {k: extra.get(f"{c}_{k}") for k in ("NS", "ns_drop", "safe", "ES", "PS")}
                            for c, _ in layers}
    elif extra:
        out["committed"] = {"preset": {k: extra.get("ROME", {}).get(k) for k in ("ES", "PS", "NS")},
                            "unedited": {k: extra.get("unedited", {}).get(k) for k in ("ES", "PS", "NS")}}
    for lname, layer in layers:
        t = time.perf_counter()
        try:
            edit = compute_rome_edit(model, rec.request, layer=layer, stats=stats_for(layer),
                                     hparams=dataclasses.replace(hp, layer=layer), prefixes=prefixes)
        except AlreadySatisfiedError as err:  # nothing to edit: logged as skipped, left out of the statistics
            out["skipped"] = str(err)
            return out
        edit_s = time.perf_counter() - t
        for cname, e in ((f"{lname} C", edit), (f"{lname} no C", reinsert(model, edit, None))):
            t = time.perf_counter()
            res = predict_interference(model, rec, edit=e, banks=("neighbourhood", "known", "corpus"),
                                       known_facts=known, n_known=args.n_known, corpus=corpus,
                                       corpus_tokens=args.corpus_tokens, exact=True, require_known=False)
            pred_s = time.perf_counter() - t
            with edited(model, e):
                after = record_metrics(model, rec, generation=False)
            nb = res.bank_summary("neighbourhood")
            kn = res.bank_summary("known")
            row = {"layer": layer, "edit_s": edit_s, "predict_s": pred_s, "final_p_target": float(edit.loss_trace[-1, 4]),
                   "risk": res.risk, "ns_pred_drop": nb["pred_drop"], "ns_pred_mean": nb["pred_mean_change"],
                   "ns_exact_drop": nb.get("exact_drop"), "ns_lam_max": nb["lam_max"], "lam_max": res.lam_max,
                   "known_pred_drop": kn["pred_drop"], "known_exact_drop": kn.get("exact_drop"), "n_known": res.n_known,
                   "known_flips": res.n_known_flips, "change_norm": res.change_norm,
                   "lam_q": {b: {str(q): v for q, v in d.items()} for b, d in res.lam_quantiles().items()},
                   **{k: after[k] for k in ("ES", "PS", "NS", "NM")},
                   "ns_drop": base["NS"] - after["NS"],
                   "prompts": [[e.bank, e.margin, e.predicted, e.exact] for e in res.effects]}
            out["conditions"][cname] = row
    return out


# --- statistics ------------------------------------------------------------------------------

def _ranks(x):
    import pandas as pd

    return pd.Series(x).rank().to_numpy()


def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def auc(score, label) -> float:
    """ROC AUC (Mann-Whitney, ties count half): P(score of a positive > score of a negative)."""
    score, label = np.asarray(score, float), np.asarray(label, bool)
    pos, neg = score[label], score[~label]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    r = _ranks(np.concatenate([pos, neg]))
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def choose_threshold(score, label) -> float:
    """τ maximising Youden's J = TPR − FPR of "risk > τ: unsafe" (ties: the larger τ)."""
    score, label = np.asarray(score, float), np.asarray(label, bool)
    best, tau = -2.0, float("inf")
    for t in sorted(set(score.tolist()) | {-np.inf}):
        flag = score > t
        tpr = flag[label].mean() if label.any() else 0.0
        fpr = flag[~label].mean() if (~label).any() else 0.0
        if tpr - fpr >= best:
            best, tau = tpr - fpr, t
    return float(tau)


def false_safe(score, label, tau) -> float:
    """P(unsafe | risk ≤ τ): the share of edits called safe that damage the neighbourhood."""
    score, label = np.asarray(score, float), np.asarray(label, bool)
    safe = score <= tau
    return float(label[safe].mean()) if safe.any() else float("nan")


def half(case_id) -> int:
    return int(str(case_id).encode().hex(), 16) % 2 if not str(case_id).isdigit() else int(case_id) % 2


def _committed_key(condition: str):
    """The committed run's condition that made the same edit as `condition` (ROME's, with C)."""
    if condition.endswith(" C") and not condition.endswith("no C"):
        return condition[:-2]
    return None


def analyse(records: list[dict], n_boot: int = 1000) -> dict:
    conds = sorted({c for r in records for c in r["conditions"]})
    groups = {c: [(r, r["conditions"][c]) for r in records if c in r["conditions"]] for c in conds}
    # pooled per layer choice: ROME's edit and the no-C edit together
    for base in sorted({c.rsplit(" ", 2)[0] if c.endswith("no C") else c.rsplit(" ", 1)[0] for c in conds}):
        groups[f"{base} (C + no C)"] = [x for c in conds if c.startswith(base + " ") for x in groups[c]]
    out = {}
    for name, rows in groups.items():
        if not rows:
            continue
        y_drop = np.array([c[OUTCOME] for _, c in rows], float)
        y = y_drop > 1e-9
        h = np.array([half(r["case_id"]) for r, _ in rows])
        preds = {"risk": [c["risk"] for _, c in rows], "ns_pred_mean (−)": [-c["ns_pred_mean"] for _, c in rows],
                 "ns_lam_max": [c["ns_lam_max"] for _, c in rows]}
        res = {"n": len(rows), "base_unsafe": float(y.mean()),
               # how close the neighbours' keys lie to k*: the median over records of their largest |λ|
               "ns_lam_max_median": float(np.median(preds["ns_lam_max"]))}
        if all("localization" in r for r, _ in rows):
            preds["localization (−)"] = [-r["localization"]["score"] for r, _ in rows]
        for pname, p in preds.items():
            p = np.asarray(p, float)
            ci = bootstrap_ci(auc, p, y, n=n_boot)
            sci = bootstrap_ci(spearman, p, y_drop, n=n_boot)
            tau = choose_threshold(p[h == 0], y[h == 0])
            pb, yb = p[h == 1], y[h == 1]
            fs = false_safe(pb, yb, tau)
            fs_ci = bootstrap_ci(lambda a, b: false_safe(a, b, tau), pb, yb, n=n_boot)
            res[pname] = {"auc": auc(p, y), "auc_ci": [ci.lo, ci.hi], "spearman": spearman(p, y_drop),
                          "spearman_ci": [sci.lo, sci.hi], "tau": tau, "false_safe_B": fs, "false_safe_B_ci": [fs_ci.lo, fs_ci.hi],
                          "base_unsafe_B": float(yb.mean()) if len(yb) else float("nan"),
                          "passing_B": float((pb <= tau).mean()) if len(pb) else float("nan")}
        # the threshold kvmem ships (chosen on factworld), on every record of this model: does it transfer?
        r_all = np.array(preds["risk"], float)
        flagged = r_all > RISK_THRESHOLD
        fs_ci = bootstrap_ci(lambda a, b: false_safe(a, b, RISK_THRESHOLD), r_all, y, n=n_boot)
        recall = float(flagged[y].mean()) if y.any() else float("nan")
        specificity = float((~flagged[~y]).mean()) if (~y).any() else float("nan")
        res["shipped"] = {"tau": RISK_THRESHOLD, "false_safe": false_safe(r_all, y, RISK_THRESHOLD),
                          "false_safe_ci": [fs_ci.lo, fs_ci.hi], "passing": float((~flagged).mean()), "recall": recall,
                          # the rule's own point on the ROC curve, comparable between models
                          "rule_auc": (recall + specificity) / 2}
        # the first-order readout against the applied edit (every prompt of every bank)
        m = np.array([p[1] for _, c in rows for p in c["prompts"]], float)
        d = np.array([p[2] for _, c in rows for p in c["prompts"]], float)
        x = np.array([p[3] for _, c in rows for p in c["prompts"]], float)
        flip_pred, flip_x = (m > 0) & (m + d <= 0), (m > 0) & (m + x <= 0)
        res["readout"] = {"n_prompts": len(m), "pearson": float(np.corrcoef(d, x)[0, 1]) if len(m) > 2 else float("nan"),
                          "median_abs_err": float(np.median(np.abs(d - x))), "median_abs_exact": float(np.median(np.abs(x))),
                          "flip_agreement": float((flip_pred == flip_x).mean()),
                          "exact_flips": int(flip_x.sum()), "predicted_flips": int(flip_pred.sum())}
        res["exact_vs_measured_ns"] = float(np.mean([abs((c["ns_exact_drop"] or 0) - c[OUTCOME]) < 1e-9 for _, c in rows]))
        # the committed run's NS for the same edit (CounterFact: editing_gemma250; diagnose: bench_diagnose)
        same = [abs(c["NS"] - r["committed"][k]["NS"]) < 1e-6 for (r, c), k in
                ((x, _committed_key(name)) for x in rows) if k and r.get("committed", {}).get(k, {}).get("NS") is not None]
        res["committed_ns_equal"] = [int(sum(same)), len(same)]
        out[name] = res
    return out


def fmt(v, ci=None, d=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    s = f"{v:.{d}f}"
    if ci and not any(c != c for c in ci):
        s += f" [{ci[0]:.{d}f}, {ci[1]:.{d}f}]"
    return s


def markdown(meta, res, n_records, n_skipped=0) -> str:
    skipped = f" ({n_skipped} skipped: the model already answers their new object)" if n_skipped else ""
    L = [f"# Predicted interference vs measured neighbourhood damage: {meta['model']} ({meta['source']})", "",
         f"{provenance_line(meta)} {n_records} records{skipped}.", "",
         "Outcome: the record's NS drops (NS before − after > 0; NS = share of neighbourhood prompts ranking the "
         "true object over the new one). `risk`: predicted share of the right neighbour prompts that flip "
         "(first-order readout through the network); `ns_pred_mean (−)`: minus the predicted mean margin change "
         "(nats/token); `ns_lam_max`: largest |λ| over the neighbour prompts' keys; `localization (−)`: minus the "
         "diagnose run's localization score. AUC for \"NS drops\" and Spearman ρ with the NS drop over all records "
         "(95% bootstrap CI); τ chosen (Youden) on the records of even case_id, false-safe rate P(NS drops | "
         "predictor ≤ τ) on the odd ones.", ""]
    cols = ["condition", "predictor", "n", "base unsafe", "AUC", "Spearman ρ", "τ (half A)", "false-safe (half B)",
            "base unsafe (B)", "passing (B)"]
    L += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for cond, r in res.items():
        for p in [k for k in r if isinstance(r[k], dict) and "auc" in r[k]]:
            x = r[p]
            L.append(f"| {cond} | {p} | {r['n']} | {r['base_unsafe']:.2f} | {fmt(x['auc'], x['auc_ci'])} | "
                     f"{fmt(x['spearman'], x['spearman_ci'])} | {fmt(x['tau'], d=3)} | {fmt(x['false_safe_B'], x['false_safe_B_ci'])} | "
                     f"{fmt(x['base_unsafe_B'])} | {fmt(x['passing_B'])} |")
    L += ["", f"At kvmem's shipped threshold (`RISK_THRESHOLD` = {RISK_THRESHOLD:g}, chosen on factworld: risk above "
          "it = unsafe), over all records: false-safe rate P(NS drops | called safe), the share called safe "
          "(passing), recall (the share of the NS-dropping edits it flags) and the rule's AUC ((recall + "
          "specificity) / 2: the threshold's own point on the ROC curve).", "",
          "| condition | n | base unsafe | false-safe | passing | recall | rule's AUC |", "|---|---|---|---|---|---|---|"]
    for cond, r in res.items():
        x = r["shipped"]
        L.append(f"| {cond} | {r['n']} | {r['base_unsafe']:.2f} | {fmt(x['false_safe'], x['false_safe_ci'])} | "
                 f"{fmt(x['passing'])} | {fmt(x['recall'])} | {fmt(x.get('rule_auc'))} |")
    L += ["", "First-order readout against the applied edit (all neighbourhood and known-fact prompts): Pearson of "
          "predicted and exact margin change, median |error| vs median |exact change| (nats/token), agreement of "
          "predicted and actual flips; `exact = measured`: share of records whose exact (t = 1) NS drop equals the "
          "NS drop measured with the edit applied to the weights; `NS = committed run's`: records whose NS after "
          "ROME's edit equals the committed run's (editing_gemma250 / bench_diagnose) for the same record and layer.", "",
          "| condition | prompts | Pearson | median abs err | median abs change | flip agreement | flips (exact / predicted) | exact = measured | NS = committed run's |",
          "|---|---|---|---|---|---|---|---|---|"]
    for cond, r in res.items():
        o = r["readout"]
        L.append(f"| {cond} | {o['n_prompts']} | {fmt(o['pearson'], d=3)} | {fmt(o['median_abs_err'], d=3)} | "
                 f"{fmt(o['median_abs_exact'], d=3)} | {fmt(o['flip_agreement'], d=3)} | {o['exact_flips']} / {o['predicted_flips']} | "
                 f"{fmt(r['exact_vs_measured_ns'])} | {'{} of {}'.format(*r['committed_ns_equal']) if r['committed_ns_equal'][1] else 'n/a'} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="factworld")
    ap.add_argument("--source", choices=("counterfact", "diagnose"), default="diagnose")
    ap.add_argument("--n-records", type=int, default=250)
    ap.add_argument("--stats-tokens", type=int, default=None, help="default 200000 (factworld: 20000 of its text)")
    ap.add_argument("--n-known", type=int, default=20)
    ap.add_argument("--corpus-tokens", type=int, default=500)
    ap.add_argument("--diagnose-log", default=None)
    ap.add_argument("--diagnose-layers", nargs="+", choices=("fixed", "diagnosed"), default=["fixed", "diagnosed"],
                    help="--source diagnose: which of each fact's layers to edit (one of them halves the time; "
                         "the output name then says which)")
    ap.add_argument("--committed", default=None, help="committed per-record CounterFact log to compare NS with")
    add_data_arguments(ap, "counterfact", "corpus", "pararel", "known")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    add_run_arguments(ap, "records")
    ap.add_argument("--boot", type=int, default=1000)
    args = ap.parse_args(argv)
    check_run_arguments(ap, args)
    torch.set_num_threads(args.threads)

    from kvmem.runs import RunLog, write_atomic

    name = f"interference_{args.model}_{args.source}"
    if args.source == "diagnose" and len(args.diagnose_layers) == 1:
        name += f"_{args.diagnose_layers[0]}"
    prefix = Path(args.out or results_dir("interference") / name)
    plan = RunPlan.from_args(args, f"{prefix}.jsonl")
    settings = {k: getattr(args, k) for k in ("model", "source", "stats_tokens", "n_known", "corpus_tokens")}
    if args.source == "diagnose":
        settings["diagnose_layers"] = args.diagnose_layers
    plan.merge_shards("records")
    if plan.summarising:
        log = RunLog(plan.log, json.loads(plan.log.read_text().splitlines()[0])["settings"])
        records = list(log.records().values())
        # this summary's own provenance (the log grows over several runs and machines); where the
        # cases came from, from the last computing run's summary
        meta = {**provenance(__file__, argv), "model": args.model, "source": args.source}
        old = Path(f"{prefix}.json")
        if old.exists():
            meta["cases_from"] = json.loads(old.read_text()).get("cases_from")
    else:
        from bench_editing import load
        from kvmem.editing import context_prefixes, rome_hparams, second_moment
        from kvmem.recall import answered_facts
        from tqdm.auto import tqdm

        model = load(args.model, args.device)
        for p in model.parameters():
            p.requires_grad_(False)
        if args.model == "factworld":
            from kvmem.core.facts import Fact
            from kvmem.factworld import corpus as fw_corpus, counterfact_records

            corpus = fw_corpus()
            n_tok = args.stats_tokens or 20_000
            pool = [Fact(r.request.prompt, r.subject, target_true=r.request.target_true) for r in counterfact_records(n_neighbours=0, seed=0)[-200:]]
        else:
            from kvmem.data import load_known_facts

            corpus = data_file(args, "corpus")
            n_tok = args.stats_tokens or 200_000
            pool = load_known_facts(data_file(args, "known"))[:200]
        if args.source == "diagnose":
            cases, src = diagnose_cases(args.model, args, args.diagnose_layers)
            cases = cases[: args.n_records]
        else:
            cases, src = counterfact_cases(model, args)
        settings.update(corpus=data_name(args, "corpus") if args.model != "factworld" else "factworld", stats_tokens=n_tok)
        log = RunLog(plan.write_log, settings, restart=args.restart)
        cases = plan.select(cases, lambda c: str(c[0].case_id))
        known = answered_facts(model, pool, progress=False)
        memo = {}

        def stats_for(layer):
            if layer not in memo:
                memo[layer] = second_moment(model, layer, corpus, n_tokens=n_tok, progress=False)
            return memo[layer]

        hp = rome_hparams(model)
        if args.model == "factworld":
            hp = dataclasses.replace(hp, prefixes=((5, 5), (10, 5)))
        prefixes = context_prefixes(model, hp)
        for rec, layers, extra in tqdm(cases, desc="records"):
            if str(rec.case_id) in log:
                continue
            log.add(str(rec.case_id), run_record(model, rec, layers, extra, stats_for, prefixes, known, corpus, args))
        if plan.shard is not None:
            print(f"shard {args.shard}: {len(log)} records logged to {plan.write_log}; `--merge N` summarises")
            return
        records = [log.records()[str(r.case_id)] for r, _, _ in cases if str(r.case_id) in log]
        meta = {**provenance(__file__, argv, model.cfg.device), "model": args.model, "source": args.source,
                "cases_from": src}
    res = analyse(records, args.boot)
    write_atomic(f"{prefix}.json", json.dumps({**meta, "settings": settings, "n_records": len(records), "results": res},
                                              indent=1, default=float))
    md = markdown(meta, res, len(records), sum("skipped" in r for r in records))
    write_atomic(f"{prefix}.md", md)
    print(md)


if __name__ == "__main__":
    main()
