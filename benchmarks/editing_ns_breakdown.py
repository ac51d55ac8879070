"""Where does a ROME table's neighbourhood loss come from? Reads the per-record results of
`bench_editing.py` (no model needed) and writes <out>_ns.md: the paired NS drop with a bootstrap
CI, how many records lose / gain neighbours, how concentrated the loss is, and the drop by relation.

    python benchmarks/editing_ns_breakdown.py benchmarks/results/editing/editing_gemma250 --model gemma-3-270m

The relations come from the CounterFact file (--counterfact, else the data folder: --data, $KVMEM_DATA,
or ../shared/data beside the repository).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import add_data_arguments, bootstrap_ci, command_line, data_file


def breakdown(records_csv: Path, counterfact: Path, n_boot: int = 2000, seed: int = 0) -> dict:
    import numpy as np
    import pandas as pd

    df = pd.read_csv(records_csv)
    rel = {r["case_id"]: r["requested_rewrite"].get("relation_id") for r in json.loads(counterfact.read_text())}
    u = df[df.condition == "unedited"].set_index("case_id")
    e = df[df.condition == "ROME"].set_index("case_id")
    ok = e.index[e.error.isna()]
    drop = (u.loc[ok, "NS"] - e.loc[ok, "NS"]) * 100  # points, per record
    ci = bootstrap_ci(np.mean, drop.to_numpy(), n=n_boot, seed=seed)
    worst = max(1, round(0.1 * len(drop)))
    by_rel = (pd.DataFrame({"drop": drop.to_numpy(), "relation": [rel.get(i) for i in ok]})
              .groupby("relation")["drop"].agg(["mean", "count"]).sort_values("mean", ascending=False))
    return {
        "n": int(len(drop)), "n_failed": int(len(e) - len(ok)),
        "ns_unedited": float(u.loc[ok, "NS"].mean() * 100), "ns_edited": float(e.loc[ok, "NS"].mean() * 100),
        "drop_mean": float(drop.mean()), "drop_ci": [ci.lo, ci.hi],
        "n_lose": int((drop > 0).sum()), "n_gain": int((drop < 0).sum()), "n_same": int((drop == 0).sum()),
        "n_worst": worst, "worst_share": float(drop.nlargest(worst).sum() / drop.sum()) if drop.sum() else float("nan"),
        "n_drop_ge_30": int((drop >= 30).sum()),
        "by_relation": [{"relation": r, "mean_drop": float(m), "n": int(c)} for r, (m, c) in by_rel.iterrows()],
    }


def markdown(res: dict, argv: list[str]) -> str:
    lo, hi = res["drop_ci"]
    lines = [
        "# Neighbourhood loss of the ROME table, record by record", "",
        f"`{command_line(__file__, argv)}`", "",
        f"- {res['n']} edited records ({res['n_failed']} edits refused): NS {res['ns_unedited']:.1f} unedited, "
        f"{res['ns_edited']:.1f} edited; paired drop {res['drop_mean']:.1f} points, 95% bootstrap CI {lo:.1f}-{hi:.1f}",
        f"- {res['n_lose']} records lose neighbours, {res['n_gain']} gain, {res['n_same']} unchanged; "
        f"{res['n_drop_ge_30']} lose at least 30 points (3 of 10 neighbours)",
        f"- the {res['n_worst']} worst records (10%) carry {res['worst_share']:.0%} of the total drop", "",
        "| relation | mean drop (points) | records |", "|---|---|---|",
    ]
    lines += [f"| {r['relation']} | {r['mean_drop']:.1f} | {r['n']} |" for r in res["by_relation"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the bench_editing --out prefix, e.g. benchmarks/results/editing/editing_gemma250")
    ap.add_argument("--model", default="gemma-3-270m")
    add_data_arguments(ap, "counterfact")
    ap.add_argument("--bootstrap", type=int, default=2000)
    args = ap.parse_args(argv)
    csv = Path(f"{args.out}_{args.model.replace('/', '_')}_records.csv")
    if not csv.exists():
        ap.error(f"{csv} does not exist: run bench_editing.py with --out {args.out} first")
    res = breakdown(csv, Path(data_file(args, "counterfact")), args.bootstrap)
    text = markdown(res, argv)
    Path(f"{args.out}_ns.md").write_text(text)
    Path(f"{args.out}_ns.json").write_text(json.dumps(res, indent=1))
    print(text)


if __name__ == "__main__":
    main()
