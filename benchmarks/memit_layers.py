"""Does one MEMIT / AlphaEdit batch reach its targets? A sweep over edit layers, λ and the spread rule.

    python benchmarks/memit_layers.py --model gemma-3-270m --n-requests 8
    python benchmarks/memit_layers.py --model factworld --layer-sets 0,1 1 --lambdas 512

For the first --n-requests CounterFact dev records (factworld: its own records), one batch edit per
setting, on the unedited model: the share of the residual gap ‖z − h‖ left after the update
(`residual["after"]`: 0 = every request's target residual reached, 1 = nothing moved; above 1 =
overshoot), and ES / PS / NS of the batch's records scored under that one edit
(`kvmem.evaluation.records_metrics`). v* is fitted once per request and last layer (`value_cache`),
so settings sharing the last layer differ only in how the update is solved and spread.
Results: benchmarks/results/editing/memit_layers_<model>.md/.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from common import add_data_arguments, data_file, provenance, provenance_line, results_dir, table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n-requests", type=int, default=8)
    ap.add_argument("--layer-sets", nargs="+", default=None,
                    help="comma-separated layer sets (default: the preset's, then shorter sets ending at its last layer, then its last alone)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=None, help="MEMIT λ values (default: the preset's, and 1/8 of it)")
    ap.add_argument("--spreads", nargs="+", default=["equal", "gain"])
    ap.add_argument("--stats-tokens", type=int, default=200_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    add_data_arguments(ap, "counterfact", "corpus")
    args = ap.parse_args(argv)

    import torch

    import kvmem
    from kvmem.editing import second_moment
    from kvmem.editing.memit import compute_memit_edit, memit_hparams
    from kvmem.evaluation import records_metrics

    torch.set_num_threads(args.threads)
    model = kvmem.load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    if args.model == "factworld":
        from kvmem.factworld import corpus, counterfact_records, shipped_world

        records = counterfact_records(shipped_world(), n=args.n_requests)
        corpus_text = corpus()
    else:
        from kvmem.data import load_counterfact

        records = load_counterfact(data_file(args, "counterfact"))[: args.n_requests]
        corpus_text = data_file(args, "corpus")
    preset = memit_hparams(model)
    base = tuple(preset.layers)
    sets = ([tuple(int(x) for x in s.split(",")) for s in args.layer_sets] if args.layer_sets else
            [base[i:] for i in range(len(base))])
    lambdas = args.lambdas or [preset.mom2_update_weight, preset.mom2_update_weight / 8]
    stats = {l: second_moment(model, l, corpus_text, n_tokens=args.stats_tokens, progress=False)
             for l in sorted({l for s in sets for l in s})}
    metrics = ("ES", "PS", "NS")
    unedited = records_metrics(model, records, generation=False)
    before = {m: sum(r[m] for r in unedited) / len(records) for m in metrics}
    cache, rows = {}, []
    for layers in sets:
        for spread in args.spreads:
            if len(layers) == 1 and spread != args.spreads[0]:
                continue  # one layer: nothing to spread
            for method in ("memit", "alphaedit"):
                for lam in (lambdas if method == "memit" else [preset.mom2_update_weight]):
                    hp = dataclasses.replace(memit_hparams(model, null_space=method == "alphaedit"), layers=layers,
                                             spread=spread, mom2_update_weight=lam)
                    t = time.perf_counter()
                    edit = compute_memit_edit(model, [r.request for r in records], stats=stats, hparams=hp,
                                              value_cache=cache)
                    solve_s = time.perf_counter() - t
                    with kvmem.edited(model, edit):
                        after = records_metrics(model, records, generation=False)
                    row = {"layers": list(layers), "spread": spread, "method": method,
                           "lambda": lam if method == "memit" else None, "l2": hp.l2 if method == "alphaedit" else None,
                           "residual_after": edit.residual["after"], "z_gap": edit.residual["z_gap"],
                           "n_edited": len(edit.requests), "seconds": solve_s,
                           **{m: sum(r[m] for r in after) / len(records) for m in metrics}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    prov = provenance(__file__, argv)
    out = args.out or str(results_dir("editing") / f"memit_layers_{args.model.replace('/', '_')}")
    with open(f"{out}.json", "w") as f:
        json.dump({**prov, "n_requests": len(records), "unedited": before, "preset": {
            "layers": list(base), "lambda": preset.mom2_update_weight, "l2": preset.l2}, "rows": rows}, f, indent=1)
    lines = [f"# One MEMIT / AlphaEdit batch: layers, λ and spread ({args.model})", "", provenance_line(prov), "",
             f"{len(records)} requests in one batch, each setting on the unedited model; preset: layers {list(base)}, "
             f"λ {preset.mom2_update_weight:g}, AlphaEdit α {preset.l2:g}. Unedited ES {100 * before['ES']:.1f}, "
             f"PS {100 * before['PS']:.1f}, NS {100 * before['NS']:.1f}. `residual after`: share of ‖z − h‖ left after "
             "the update (0: targets reached; > 1: overshoot). Metrics ×100, the batch's records under its one edit.", "",
             table(["layers", "spread", "method", "residual after", "ES", "PS", "NS"],
                   [[",".join(map(str, r["layers"])), r["spread"],
                     f"MEMIT λ={r['lambda']:g}" if r["method"] == "memit" else f"AlphaEdit α={r['l2']:g}",
                     f"{r['residual_after']:.3f}", f"{100 * r['ES']:.1f}", f"{100 * r['PS']:.1f}", f"{100 * r['NS']:.1f}"]
                    for r in rows]), ""]
    with open(f"{out}.md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
