"""An attribution-estimated AIE beside the exact one: the same curves, the same facts and more.

    python benchmarks/aie_attribution.py --model gemma-3-270m --tag eap-ig4

Reads the exact run's log (`aie_<model>.jsonl`, `trace_known_facts.py`) and the estimated run's
(`aie_<model>_<tag>.jsonl`, `trace_known_facts.py --method ... --tag <tag>`), both resumable
logs of per-fact bucket effects, and averages them with `kvmem.tracing.average_records` three ways:
the exact AIE over its facts, the estimate over those same facts (the method's error alone), and
the estimate over every fact its log holds (what the cheap method buys: more facts). Per kind and
ROME's two tokens (last subject token, last token): the peak layer and its AIE, and the Pearson
correlation of the estimated curve with the exact one. Writes `aie_<model>_<tag>_vs_exact.{json,md,png}`
in benchmarks/results/tracing/. Both logs must share noise, samples, seed and window.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import pearson, provenance, provenance_line, results_dir, table

TOKENS = ("last subject token", "last token")


def read_log(path: Path) -> tuple[dict, list[dict]]:
    lines = path.read_text().splitlines()
    return json.loads(lines[0])["settings"], [json.loads(l)["record"] for l in lines[1:]]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tag", required=True, help="the estimated run's tag (aie_<model>_<tag>.jsonl)")
    ap.add_argument("--dir", default=str(results_dir("tracing")))
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import torch

    from kvmem.tracing import average_records

    folder = Path(args.dir)
    exact_settings, exact = read_log(folder / f"aie_{args.model}.jsonl")
    est_settings, est = read_log(folder / f"aie_{args.model}_{args.tag}.jsonl")
    for k in ("noise", "samples", "seed", "window", "kinds"):
        if exact_settings[k] != est_settings[k]:
            ap.error(f"the two logs differ in {k}: {exact_settings[k]} vs {est_settings[k]}")
    kinds, window = tuple(exact_settings["kinds"]), exact_settings["window"]
    n_layers = len(exact[0]["bucket_ie"][kinds[0]][0] or next(b for b in exact[0]["bucket_ie"][kinds[0]] if b))
    kw = dict(noise=exact_settings["noise"], window=window, samples=exact_settings["samples"])

    def key(r):
        return (r["prompt"], r["subject"], r["target"])

    est_by_key = {key(r): r for r in est}
    shared = [r for r in exact if key(r) in est_by_key]
    averages = {
        "exact": average_records(shared, kinds, n_layers, **kw),
        "estimate, same facts": average_records([est_by_key[key(r)] for r in shared], kinds, n_layers, **kw),
        "estimate, all facts": average_records(est, kinds, n_layers, **kw),
    }
    method = f"{est_settings.get('method')} (steps {est_settings.get('steps')})"
    rows, summary_rows = [], []
    for kind in kinds:
        for tok in TOKENS:
            b = averages["exact"].buckets.index(tok)
            curves = {name: a[kind][b].tolist() for name, a in averages.items()}
            row = {"kind": kind, "token": tok}
            for name, c in curves.items():
                peak = max(range(n_layers), key=lambda i: c[i])
                row[name] = {"peak_layer": peak, "peak_aie": c[peak], "curve": c,
                             "pearson_vs_exact": pearson(torch.tensor(c), torch.tensor(curves["exact"])) if name != "exact" else 1.0}
            summary_rows.append(row)
            rows.append([kind, tok] + [f"{row[n]['peak_layer']} ({row[n]['peak_aie']:.3f})" for n in curves]
                        + [f"{row[n]['pearson_vs_exact']:.3f}" for n in list(curves)[1:]])
    summary = {**provenance(__file__, argv), "model": args.model, "tag": args.tag, "method": method,
               "n_facts": {n: a.n_facts for n, a in averages.items()}, "window": window, "noise": kw["noise"],
               "samples": kw["samples"], "rows": summary_rows}
    stem = f"aie_{args.model}_{args.tag}_vs_exact"
    (folder / f"{stem}.json").write_text(json.dumps(summary, indent=1))

    fig, axes = plt.subplots(len(TOKENS), len(kinds), figsize=(4.2 * len(kinds), 3.2 * len(TOKENS)), squeeze=False)
    styles = {"exact": ("k", "-"), "estimate, same facts": ("tab:blue", "--"), "estimate, all facts": ("tab:orange", ":")}
    for j, kind in enumerate(kinds):
        for i, tok in enumerate(TOKENS):
            ax = axes[i][j]
            b = averages["exact"].buckets.index(tok)
            for name, a in averages.items():
                color, ls = styles[name]
                ax.plot(range(n_layers), a[kind][b].tolist(), color=color, ls=ls, label=f"{name} ({a.n_facts})")
            ax.set_title(f"{kind} @ {tok}", fontsize=9)
            ax.set_xlabel("layer")
            if j == 0:
                ax.set_ylabel("AIE")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{args.model}: AIE exact vs {method} (window {window})", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / f"{stem}.png", dpi=110, bbox_inches="tight")

    n = summary["n_facts"]
    names = list(averages)
    lines = [provenance_line(summary), "",
             f"AIE exact over {n['exact']} facts (`aie_{args.model}.jsonl`) beside the AIE estimated by {method} "
             f"over the same facts and over all {n['estimate, all facts']} facts its log holds "
             f"(`aie_{args.model}_{args.tag}.jsonl`); window {window}, {kw['samples']} noise samples, noise "
             f"{kw['noise']:.4g}. Cells: peak layer (AIE at the peak); Pearson: the estimated curve against the exact "
             "one over layers.", "",
             table(["kind", "token"] + [f"{x}: peak" for x in names] + [f"{x}: Pearson" for x in names[1:]], rows),
             "", f"Figure: `{stem}.png`."]
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
