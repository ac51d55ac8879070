"""`layer="least-interference"` against the causal-tracing peak and the preset, on ES/PS/NS.

    python benchmarks/interference_layers.py --model factworld --threads 1
    python benchmarks/interference_layers.py --model gemma-3-270m --n-records 30 --threads 1   # ~5 min a fact

For each fact of the committed `bench_diagnose` run of the model, ROME's edit is computed at every
candidate layer (default: the first half of the model), `predict_interference` (neighbourhood bank)
gives each its risk, and each is applied and measured (ES, PS, NS: `record_metrics`). The chooser's
layer is the lowest-risk one among those reaching the edit (ES read exactly, before applying,
`least_interference_edit`'s rule); the tracing peak ("diagnosed") and the preset ("fixed") are the
diagnose run's layers, measured here too when they are candidates, and also read from the diagnose log.

Per-fact rows go to PREFIX.jsonl (resumable); PREFIX.md summarises. Default PREFIX:
benchmarks/results/interference/layers_<model>.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import add_data_arguments, bootstrap_ci, data_file, provenance, provenance_line, results_dir
from interference_validation import diagnose_cases


def run_fact(model, rec, extra, layers, stats_for, prefixes, hp) -> dict:
    from kvmem.editing import compute_rome_edit, edited
    from kvmem.editing.interference import predict_interference, prompt_effects
    from kvmem.evaluation import record_metrics

    out = {"case_id": rec.case_id, "subject": rec.subject, "unedited": record_metrics(model, rec, generation=False),
           "diagnosed_layer": extra["diagnosed_layer"], "fixed_layer": extra["fixed_layer"],
           "committed": {c: {k: extra.get(f"{c}_{k}") for k in ("ES", "PS", "NS")} for c in ("diagnosed", "fixed")},
           "score": extra.get("score"), "layers": {}}
    f = rec.request
    for l in layers:
        t = time.perf_counter()
        e = compute_rome_edit(model, f, layer=l, stats=stats_for(l), hparams=dataclasses.replace(hp, layer=l),
                              prefixes=prefixes)
        res = predict_interference(model, rec, edit=e, banks=("neighbourhood",), require_known=False)
        (m, _, x, _), = prompt_effects(model, e, [(f.prompt, f.target("new"), f.target("true"))], exact=True)
        with edited(model, e):
            after = record_metrics(model, rec, generation=False)
        out["layers"][str(l)] = {"risk": res.risk, "lam_max": res.lam_max, "reaches": bool(m + x > 0),
                                 **{k: after[k] for k in ("ES", "PS", "NS")}, "s": time.perf_counter() - t}
    ok = [l for l in layers if out["layers"][str(l)]["reaches"]]
    out["chosen"] = min(ok, key=lambda l: (out["layers"][str(l)]["risk"], out["layers"][str(l)]["lam_max"], l)) if ok else None
    return out


def _ci(values, n_boot):
    if not values:
        return None
    ci = bootstrap_ci(np.mean, np.asarray(values, float), n=n_boot)
    return [ci.lo, ci.hi]


def summarise(records, n_boot=1000) -> dict:
    rows, per_fact = {}, {}
    for name, pick in (("least-interference", lambda r: r["chosen"]), ("tracing peak", lambda r: r["diagnosed_layer"]),
                       ("preset", lambda r: r["fixed_layer"])):
        per_fact[name] = {}
        for i, r in enumerate(records):
            l = pick(r)
            cell = r["layers"].get(str(l)) if l is not None else None
            if cell is None:  # not a candidate: the diagnose run's own measurement
                c = r["committed"]["diagnosed" if name == "tracing peak" else "fixed"] if name != "least-interference" else None
                if not c or c.get("ES") is None:
                    continue
                cell = c
            per_fact[name][i] = cell
        vals = {k: [cell[k] for cell in per_fact[name].values()] for k in ("ES", "PS", "NS")}
        rows[name] = {"n": len(per_fact[name]), **{k: float(np.mean(v)) if v else float("nan") for k, v in vals.items()},
                      **{f"{k}_ci": _ci(v, n_boot) for k, v in vals.items()}}
    rows["unedited"] = {"n": len(records), **{k: float(np.mean([r["unedited"][k] for r in records])) for k in ("ES", "PS", "NS")}}
    counts = {}
    for r in records:
        counts[str(r["chosen"])] = counts.get(str(r["chosen"]), 0) + 1
    # the same facts under two rules: least-interference minus the other, per fact
    paired = {}
    for other in ("tracing peak", "preset"):
        both = sorted(set(per_fact["least-interference"]) & set(per_fact[other]))
        row = {"n": len(both)}
        for k in ("PS", "NS"):
            d = [per_fact["least-interference"][i][k] - per_fact[other][i][k] for i in both]
            row[k] = float(np.mean(d)) if d else float("nan")
            row[f"{k}_ci"] = _ci(d, n_boot)
        paired[other] = row
    return {"table": rows, "chosen_layers": counts, "paired": paired}


def markdown(meta, s, n) -> str:
    L = [f"# least-interference layer vs tracing peak vs preset: {meta['model']}", "", f"{provenance_line(meta)} {n} facts "
         "of the committed diagnose run.", "", "ES/PS/NS: ROME's metrics (means, 95% bootstrap CI). Chosen layers: "
         + ", ".join(f"L{k}: {v}" for k, v in sorted(s["chosen_layers"].items())) + ".", "",
         "| layer rule | n | ES | PS | NS |", "|---|---|---|---|---|"]
    for name, r in s["table"].items():
        cells = []
        for k in ("ES", "PS", "NS"):
            ci = r.get(f"{k}_ci")
            cells.append(f"{r[k]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        L.append(f"| {name} | {r['n']} | " + " | ".join(cells) + " |")
    L += ["", "Paired, per fact: least-interference minus the other rule (mean, 95% bootstrap CI; NS > 0: the "
          "chosen layer damages the neighbourhood less).", "", "| against | n | PS difference | NS difference |",
          "|---|---|---|---|"]
    for name, r in s.get("paired", {}).items():
        cells = [f"{r[k]:+.3f}" + (f" [{r[f'{k}_ci'][0]:+.3f}, {r[f'{k}_ci'][1]:+.3f}]" if r[f"{k}_ci"] else "")
                 for k in ("PS", "NS")]
        L.append(f"| {name} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="factworld")
    ap.add_argument("--n-records", type=int, default=100)
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="candidates (default: the first half)")
    ap.add_argument("--diagnose-log", default=None)
    add_data_arguments(ap, "corpus", "pararel")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--restart", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tqdm.auto import tqdm

    from bench_editing import load
    from kvmem.editing import RomeHparams, context_prefixes, rome_hparams, second_moment
    from kvmem.runs import RunLog, write_atomic

    model = load(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    n = int(model.cfg.n_layers)
    layers = args.layers if args.layers is not None else list(range((n + 1) // 2))
    if args.model == "factworld":
        from kvmem.factworld import corpus as fw_corpus

        corpus, n_tok, hp = fw_corpus(), 20_000, RomeHparams(prefixes=((5, 5), (10, 5)))
    else:
        corpus, n_tok, hp = data_file(args, "corpus"), 200_000, dataclasses.replace(rome_hparams(model), prefixes=((5, 5), (10, 5)))
    cases, src = diagnose_cases(args.model, args)
    cases = cases[: args.n_records]
    prefix = Path(args.out or results_dir("interference") / f"layers_{args.model}")
    log = RunLog(f"{prefix}.jsonl", {"model": args.model, "layers": layers, "stats_tokens": n_tok}, restart=args.restart)
    memo = {}

    def stats_for(layer):
        if layer not in memo:
            memo[layer] = second_moment(model, layer, corpus, n_tokens=n_tok, progress=False)
        return memo[layer]

    prefixes = context_prefixes(model, hp)
    for rec, _, extra in tqdm(cases, desc="facts"):
        if str(rec.case_id) not in log:
            log.add(str(rec.case_id), run_fact(model, rec, extra, layers, stats_for, prefixes, hp))
    records = [log.records()[str(r.case_id)] for r, _, _ in cases if str(r.case_id) in log]
    s = summarise(records)
    meta = {**provenance(__file__, argv, model.cfg.device), "model": args.model, "cases_from": src}
    write_atomic(f"{prefix}.json", json.dumps({**meta, "n_records": len(records), **s}, indent=1, default=float))
    md = markdown(meta, s, len(records))
    write_atomic(f"{prefix}.md", md)
    print(md)


if __name__ == "__main__":
    main()
