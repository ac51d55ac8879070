"""How MEMIT's ridge λ trades paraphrases against the neighbourhood, on one saved batch edit.

    python benchmarks/memit_ridge.py --model gemma-3-270m \
        --edit benchmarks/results/editing/memit200_gemma-3-270m/batch_edits --lambdas 256 64 16 --alphaedit 1

A one-layer MEMIT edit keeps what its solve needs: the requests' keys K (rows, averaged over the context
prefixes) and the residual targets R = V (`MultiLayerEdit`). So the same batch at another λ is
ΔW = U'R with U' = (λC + KᵀK)⁻¹Kᵀ, and AlphaEdit's one-batch update from the same K and R has
U' = (P KᵀK + αI)⁻¹ P Kᵀ (P: C's null space, the preset's threshold): no v* is fitted again (the slow
part, about 30 s a request for Gemma-3-270m on one CPU thread). Before anything is scored, the script
re-solves at the edit's own λ and checks that it reproduces the saved U (same C, same solve).

Each setting's edit is applied once and the batch's CounterFact records are scored under it
(`records_metrics`: ES, PS, NS), beside the unedited model on the same records.
Results: benchmarks/results/editing/memit_ridge_<model>.md/.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from common import add_data_arguments, bootstrap_ci, data_file, provenance, provenance_line, results_dir, table

METRICS = ("ES", "PS", "NS")


def edit_file(path: str) -> Path:
    """The edit itself, or the one `*.safetensors` in a folder (`kvmem edit`'s `OUT/batch_edits`)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise SystemExit(f"{p} holds {len(found)} edit files; pass one of them with --edit.")
        return found[0]
    return p


def resolved(edit, C, *, lam: float | None = None, alpha: float | None = None, P=None):
    """The edit with U solved again from its own keys: MEMIT at ridge `lam`, or AlphaEdit (`P`, `alpha`)."""
    from kvmem.editing import solve_update

    if alpha is None:
        method, hp = "memit", dataclasses.replace(edit.hparams, mom2_update_weight=lam, null_space=False)
    else:
        method, hp = "alphaedit", dataclasses.replace(edit.hparams, l2=alpha, null_space=True)
    U = solve_update(edit.keys[0], C, hp, P=P)
    return dataclasses.replace(edit, U=(U,), method=method, hparams=hp, keys_after=())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--edit", required=True, help="a one-layer MEMIT edit file, or the folder holding it")
    ap.add_argument("--lambdas", type=float, nargs="+", default=None, help="MEMIT λ values (default: the edit's, and 1/4, 1/16 of it)")
    ap.add_argument("--alphaedit", type=float, nargs="*", default=[], help="AlphaEdit α values (one batch, no earlier edits)")
    ap.add_argument("--stats-tokens", type=int, default=200_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    add_data_arguments(ap, "counterfact", "corpus")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    import kvmem
    from kvmem.editing import null_space, second_moment
    from kvmem.evaluation import records_metrics

    torch.set_num_threads(args.threads)
    path = edit_file(args.edit)
    edit = kvmem.load_edit(path)
    if getattr(edit, "method", None) != "memit" or len(edit.layers) != 1:
        raise SystemExit(f"{path}: a one-layer MEMIT edit is needed (this one: {getattr(edit, 'method', 'ROME')}, "
                         f"layers {list(getattr(edit, 'layers', [edit.layer]))}); a multi-layer update's later layers "
                         "depend on the earlier ones' and cannot be re-solved from the saved keys alone.")
    layer, own = edit.layers[0], edit.hparams.mom2_update_weight
    model = kvmem.load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    if args.model == "factworld":
        from kvmem.factworld import corpus, counterfact_records, shipped_world

        pool, corpus_text = counterfact_records(shipped_world()), corpus()
    else:
        from kvmem.data import load_counterfact

        pool, corpus_text = load_counterfact(data_file(args, "counterfact")), data_file(args, "corpus")
    by_request = {(r.request.prompt, r.request.subject, r.request.target_new): r for r in pool}
    missing = [q.subject for q in edit.requests if (q.prompt, q.subject, q.target_new) not in by_request]
    if missing:
        raise SystemExit(f"{len(missing)} of the edit's requests are not in the CounterFact file (e.g. {missing[:3]}).")
    records = [by_request[(q.prompt, q.subject, q.target_new)] for q in edit.requests]

    C = second_moment(model, layer, corpus_text, n_tokens=args.stats_tokens, progress=False).C
    again = resolved(edit, C, lam=own)
    rel = float((again.U[0] - edit.U[0].double()).norm() / edit.U[0].double().norm())
    if rel > 1e-6:
        raise SystemExit(f"Re-solving at the edit's own λ = {own:g} gives another U (relative difference {rel:.2e}): "
                         "C differs from the edit's (other corpus or --stats-tokens?).")
    print(f"re-solve at λ = {own:g} reproduces the saved U (relative difference {rel:.1e})", flush=True)

    settings = [("memit", lam) for lam in (args.lambdas or [own, own / 4, own / 16])]
    settings += [("alphaedit", a) for a in args.alphaedit]
    P = null_space(C, threshold=edit.hparams.nullspace_threshold, relative=edit.hparams.nullspace_relative).P if args.alphaedit else None

    unedited = records_metrics(model, records, generation=False)
    rows = []
    for method, value in settings:
        e = resolved(edit, C, lam=value) if method == "memit" else resolved(edit, C, alpha=value, P=P)
        with kvmem.edited(model, e):
            after = records_metrics(model, records, generation=False)
        row = {"method": method, "lambda" if method == "memit" else "alpha": value,
               "update_norm": float(e.delta(0).norm())}
        for m in METRICS:
            a = np.array([r[m] for r in after], dtype=float)
            row[m] = float(a.mean())
            c = bootstrap_ci(np.mean, a)
            row[f"{m}_ci"] = [c.lo, c.hi]
        drop = np.array([u["NS"] - r["NS"] for u, r in zip(unedited, after)], dtype=float)
        c = bootstrap_ci(np.mean, drop)
        row["NS_drop"], row["NS_drop_ci"] = float(drop.mean()), [c.lo, c.hi]
        rows.append(row)
        print(json.dumps(row), flush=True)

    before = {m: float(np.mean([r[m] for r in unedited])) for m in METRICS}
    prov = provenance(__file__, argv)
    out = args.out or str(results_dir("editing") / f"memit_ridge_{args.model.replace('/', '_')}")
    with open(f"{out}.json", "w") as f:
        json.dump({**prov, "edit": str(path), "layer": layer, "n_records": len(records), "edit_lambda": own,
                   "resolve_check": rel, "unedited": before, "rows": rows}, f, indent=1)

    def ci(r, m):
        lo, hi = r[f"{m}_ci"]
        return f"{100 * r[m]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"

    lines = [f"# One MEMIT batch re-solved at other λ ({args.model})", "", provenance_line(prov), "",
             f"The {len(records)} requests of `{path.name}` (one MEMIT update at layer {layer}, λ {own:g}), their keys and "
             f"targets as fitted; re-solved at λ = {own:g} it reproduces the saved update (relative difference {rel:.1e}). "
             "Each setting: one update for the whole batch, its records scored under it (×100, mean and 95% bootstrap "
             f"CI). Unedited ES {100 * before['ES']:.1f}, PS {100 * before['PS']:.1f}, NS {100 * before['NS']:.1f}; "
             "NS drop: paired, unedited − edited.", "",
             table(["solve", "‖ΔW‖", "ES", "PS", "NS", "NS drop"],
                   [[f"MEMIT λ={r['lambda']:g}" if r["method"] == "memit" else f"AlphaEdit α={r['alpha']:g}",
                     f"{r['update_norm']:.3g}", ci(r, "ES"), ci(r, "PS"), ci(r, "NS"), ci(r, "NS_drop")] for r in rows]), ""]
    Path(f"{out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
