"""One table over the models of `interference_validation.py`: does kvmem's risk threshold transfer?

    python benchmarks/interference_summary.py

Reads every results/interference/interference_<model>_<source>*.json that the validation wrote and
writes results/interference/interference_summary.md: per model, fact source and kind of edit, the
risk's AUC for "NS drops", the localization score's AUC where the facts have one, and, at the
threshold kvmem ships (`RISK_THRESHOLD`, chosen on factworld), the false-safe rate against the base
unsafe rate and the rule's own AUC, with its difference from the reference run's (Gemma-3-270m,
CounterFact, ROME's edits): the issue asks the same threshold to stay within 0.05 AUC on other models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import provenance, provenance_line, results_dir
from interference_validation import fmt

REFERENCE = ("gemma-3-270m", "counterfact", "preset C")


def rows(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("interference_*.json")):
        if path.name == "interference_summary.json":
            continue
        d = json.loads(path.read_text())
        for cond, r in d["results"].items():
            if "shipped" not in r:
                raise SystemExit(f"{path} predates the shipped-threshold columns: rerun its command with --logged-only")
            loc = r.get("localization (−)")
            out.append({"model": d["model"], "source": d["source"], "file": path.name, "condition": cond,
                        "n": r["n"], "base_unsafe": r["base_unsafe"], "lam_median": r.get("ns_lam_max_median"), "auc": r["risk"]["auc"], "auc_ci": r["risk"]["auc_ci"],
                        "spearman": r["risk"]["spearman"], "localization_auc": loc["auc"] if loc else None,
                        **{k: r["shipped"][k] for k in ("false_safe", "false_safe_ci", "passing", "recall", "rule_auc")}})
    ref = next((r for r in out if (r["model"], r["source"], r["condition"]) == REFERENCE), None)
    for r in out:
        r["rule_auc_minus_reference"] = (r["rule_auc"] - ref["rule_auc"]) if ref else None
    return out


def markdown(meta: dict, table: list[dict]) -> str:
    L = ["# Predicted interference across models: does the threshold transfer?", "",
         f"{provenance_line(meta)} From the `interference_validation.py` result files beside this one.", "",
         "Outcome: the record's NS drops. `median λ max`: over the records, the largest |λ| of the neighbour "
         "prompts' keys (how close the neighbourhood lies to the edited key). `risk AUC`: threshold-free ranking of the edits by the predicted risk; "
         "at the shipped threshold (risk > 0 = unsafe): false-safe rate P(NS drops | called safe) over all records "
         "(95% bootstrap CI) against the base unsafe rate, the share called safe, the share of damaging edits flagged, "
         "and the rule's AUC ((recall + specificity) / 2) with its difference from the reference "
         f"({REFERENCE[0]}, {REFERENCE[1]}, {REFERENCE[2]}). Conditions: \"C\" = ROME's edit, \"no C\" = the same "
         "k* → v* without the covariance (large neighbourhood damage), at the preset (\"preset\", \"fixed\") or the "
         "tracing peak (\"diagnosed\").", "",
         "| model | facts | edits | n | base unsafe | median λ max | risk AUC | localization AUC | false-safe at τ = 0 | passing | recall | rule's AUC | Δ vs reference |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        delta = r["rule_auc_minus_reference"]
        L.append(f"| {r['model']} | {r['source']} | {r['condition']} | {r['n']} | {r['base_unsafe']:.2f} | {fmt(r['lam_median'])} | "
                 f"{fmt(r['auc'], r['auc_ci'])} | {fmt(r['localization_auc'])} | {fmt(r['false_safe'], r['false_safe_ci'])} | "
                 f"{fmt(r['passing'])} | {fmt(r['recall'])} | {fmt(r['rule_auc'])} | "
                 f"{'n/a' if delta is None or delta != delta else f'{delta:+.2f}'} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=None, help="default: benchmarks/results/interference")
    args = ap.parse_args(argv)
    folder = Path(args.folder) if args.folder else results_dir("interference")
    table = rows(folder)
    meta = provenance(__file__, argv)
    (folder / "interference_summary.json").write_text(json.dumps({**meta, "rows": table}, indent=1))
    md = markdown(meta, table)
    (folder / "interference_summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
