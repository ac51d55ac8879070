"""Compare two `bench_neurons.py effects` runs of the same facts (e.g. two IG rules): per fact, the
Jaccard overlap of the knowledge-neuron sets, and the two suppress / amplify tables side by side.

    python benchmarks/compare_neuron_runs.py neurons_effects_gemma-3-270m neurons_effects_gemma-3-270m_midpoint

Names are result stems in benchmarks/results/neurons/ (--dir). Writes <dir>/<a>_vs_<b>.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import command_line, results_dir
KEYS = ("suppress_mean_over_facts", "suppress_random_mean_over_facts", "amplify_mean_over_facts",
        "amplify_random_mean_over_facts", "mean_neurons")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="a result stem, e.g. neurons_effects_gemma-3-270m")
    ap.add_argument("b", help="the other run's stem")
    ap.add_argument("--dir", default=str(results_dir("neurons")), help="where the runs' .json files are")
    args = ap.parse_args(argv)
    a_name, b_name, folder = args.a, args.b, Path(args.dir)
    a, b = (json.loads((folder / f"{n}.json").read_text()) for n in (a_name, b_name))
    key = lambda r: (r["relation"], r["target"], r["prompts"][0])  # noqa: E731
    b_rows = {key(r): r for r in b["facts"]}
    jac = []
    for r in a["facts"]:
        other = b_rows.get(key(r))
        if other is None:
            continue
        s1, s2 = {tuple(n) for n in r.get("neurons", [])}, {tuple(n) for n in other.get("neurons", [])}
        if s1 | s2:
            jac.append(len(s1 & s2) / len(s1 | s2))
    jac.sort()
    out = {"a": a_name, "b": b_name, "facts_compared": len(jac),
           "jaccard_mean": sum(jac) / len(jac) if jac else float("nan"),
           "jaccard_median": jac[len(jac) // 2] if jac else float("nan"), "jaccard_min": jac[0] if jac else float("nan"),
           "a_rule": a["config"].get("rule"), "b_rule": b["config"].get("rule")}
    lines = [f"# {a_name} vs {b_name}", "", f"`{command_line(__file__, [a_name, b_name])}`", "",
             f"{out['facts_compared']} facts in both runs. Knowledge-neuron sets: Jaccard mean {out['jaccard_mean']:.2f}, "
             f"median {out['jaccard_median']:.2f}, min {out['jaccard_min']:.2f}.", "",
             f"| | {a_name} ({out['a_rule']}) | {b_name} ({out['b_rule']}) |", "|---|---:|---:|"]
    for k in KEYS:
        va, vb = a["summary"][k], b["summary"][k]
        fmt = (lambda v: f"{v:.1f}") if k == "mean_neurons" else (lambda v: f"{100 * v:+.1f}%")
        lines.append(f"| {k} | {fmt(va)} | {fmt(vb)} |")
        out[k] = [va, vb]
    (folder / f"{a_name}_vs_{b_name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
