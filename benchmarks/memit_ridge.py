"""How MEMIT's ridge λ and its batch size trade paraphrases against the neighbourhood, on one saved batch edit.

    python benchmarks/memit_ridge.py --model gemma-3-270m \
        --edit benchmarks/results/editing/memit200_gemma-3-270m/batch_edits --lambdas 256 64 16 --alphaedit 1 \
        --batch-sizes 1 10 50

A one-layer MEMIT edit keeps what its solve needs: the requests' keys K (rows, averaged over the context
prefixes) and the residual targets R = V (`MultiLayerEdit`). So the same batch at another λ is
ΔW = U'R with U' = (λC + KᵀK)⁻¹Kᵀ, and AlphaEdit's one-batch update from the same K and R has
U' = (P KᵀK + αI)⁻¹ P Kᵀ (P: C's null space, the preset's threshold): no v* is fitted again (the slow
part, about 30 s a request for Gemma-3-270m on one CPU thread). Before anything is scored, the script
re-solves at the edit's own λ and checks that it reproduces the saved U (same C, same solve).
`--batch-sizes B`: the requests split, in order, into batches of B, each batch solved alone at the edit's
λ from its own rows of K and R (a request's R does not depend on the others' at one layer), its records
scored under its own update: the same v* and keys at every batch size, so what changes is only how many
keys share one solve.

Each setting's edit is applied once and the batch's CounterFact records are scored under it
(`records_metrics`: ES, PS, NS), beside the unedited model on the same records. Each setting also
reports, per prompt, the weight its own request's residual gets, w = max over the prompt's tokens of
kᵀU[:, i] (1 = the whole change, as at the key the solve was given), for the request prompt (E) and its
paraphrases (P), and for paraphrases the other requests' residuals arriving at that token,
‖Σ_j≠i w_j R_j‖ / ‖R_i‖ (cross): medians over the prompts.
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


def sub_batches(edit, C, size: int):
    """The saved batch split, in order, into batches of `size`, each solved alone at the edit's λ."""
    from kvmem.editing import solve_update

    K, V, n = edit.keys[0].double(), edit.V[0].double(), edit.n_requests
    out = []
    for s in range(0, n, size):
        idx = list(range(s, min(s + size, n)))
        U = solve_update(K[idx], C, edit.hparams)
        out.append((idx, dataclasses.replace(edit, U=(U,), V=(V[idx],), keys=(K[idx],), targets=edit.targets[idx],
                                             requests=tuple(edit.requests[i] for i in idx), keys_after=(), skipped=())))
    return out


def prompt_keys(model, layer: int, prompts):
    """Per prompt: its keys at `layer` at every token after the start token, [tokens, d_mlp] (float64)."""
    from kvmem.core.tokenize import encode, spec_for
    from kvmem.editing.stats import batch_keys

    spec = spec_for(model)
    return [k.double().cpu() for k in batch_keys(model, layer, ([encode(spec, p)] for p in prompts))]


def key_weights(parts, keys_of):
    """Medians over prompts of the own residual's weight (E and P prompts) and the others' arriving at
    that token (P prompts); `parts`: [(record indices, edit solving them)]; `keys_of[i]`: (E keys, [P keys])."""
    import numpy as np

    own_e, own_p, cross_p = [], [], []
    for idx, e in parts:
        U, R = e.U[0].double(), e.V[0].double()
        for j, i in enumerate(idx):
            ke, kps = keys_of[i]
            own_e.append(float((ke @ U[:, j]).max()))
            for kp in kps:
                w = kp @ U  # [tokens, requests in this solve]
                t = int(w[:, j].argmax())
                own_p.append(float(w[t, j]))
                others = w[t].clone()
                others[j] = 0.0
                cross_p.append(float((others @ R).norm() / R[j].norm()))
    med = lambda x: float(np.median(x)) if x else float("nan")  # noqa: E731
    return {"own_E": med(own_e), "own_P": med(own_p), "cross_P": med(cross_p)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--edit", required=True, help="a one-layer MEMIT edit file, or the folder holding it")
    ap.add_argument("--lambdas", type=float, nargs="+", default=None, help="MEMIT λ values (default: the edit's, and 1/4, 1/16 of it)")
    ap.add_argument("--alphaedit", type=float, nargs="*", default=[], help="AlphaEdit α values (one batch, no earlier edits)")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                    help="also split the requests into batches of B, each solved alone at the edit's λ")
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
    settings += [("batches", b) for b in args.batch_sizes if 0 < b < len(records)]
    P = null_space(C, threshold=edit.hparams.nullspace_threshold, relative=edit.hparams.nullspace_relative).P if args.alphaedit else None
    keys_of = {}
    for i, r in enumerate(records):
        ks = prompt_keys(model, layer, [r.request.prompt, *r.paraphrase_prompts])
        keys_of[i] = (ks[0], ks[1:])

    unedited = records_metrics(model, records, generation=False)
    rows = []
    for method, value in settings:
        if method == "batches":
            parts = sub_batches(edit, C, int(value))
            after = [None] * len(records)
            for idx, e in parts:
                # the saved edit's fingerprint was checked by the one-batch settings above; two hashes of
                # the weights per small batch would cost more than scoring it
                with kvmem.edited(model, e, check=False):
                    for i, m in zip(idx, records_metrics(model, [records[i] for i in idx], generation=False)):
                        after[i] = m
            row = {"method": "memit", "lambda": own, "batch_size": int(value),
                   "update_norm": float(np.median([float(e.delta(0).norm()) for _, e in parts]))}
        else:
            e = resolved(edit, C, lam=value) if method == "memit" else resolved(edit, C, alpha=value, P=P)
            parts = [(list(range(len(records))), e)]
            with kvmem.edited(model, e):
                after = records_metrics(model, records, generation=False)
            row = {"method": method, "lambda" if method == "memit" else "alpha": value, "batch_size": len(records),
                   "update_norm": float(e.delta(0).norm())}
        row.update(key_weights(parts, keys_of))
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

    def label(r):
        if r["method"] == "alphaedit":
            return f"AlphaEdit α={r['alpha']:g}"
        if r["batch_size"] < len(records):
            return f"MEMIT λ={r['lambda']:g}, batches of {r['batch_size']}"
        return f"MEMIT λ={r['lambda']:g}"

    lines = [f"# One MEMIT batch re-solved at other λ and batch sizes ({args.model})", "", provenance_line(prov), "",
             f"The {len(records)} requests of `{path.name}` (one MEMIT update at layer {layer}, λ {own:g}), their keys and "
             f"targets as fitted; re-solved at λ = {own:g} it reproduces the saved update (relative difference {rel:.1e}). "
             "Each setting: one update for the whole batch (or, \"batches of B\", one per B consecutive requests, each "
             "scoring its own records), the records scored under it (×100, mean and 95% bootstrap "
             f"CI). Unedited ES {100 * before['ES']:.1f}, PS {100 * before['PS']:.1f}, NS {100 * before['NS']:.1f}; "
             "NS drop: paired, unedited − edited. Own weight: max over a prompt's tokens of kᵀU[:, i], the share of "
             "its own request's residual the update writes there (E: the request prompt, P: paraphrases); cross: "
             "the other requests' residuals arriving at that paraphrase token, relative to its own (medians; "
             "‖ΔW‖: the median over batches).", "",
             table(["solve", "‖ΔW‖", "ES", "PS", "NS", "NS drop", "own weight E", "own weight P", "cross P"],
                   [[label(r), f"{r['update_norm']:.3g}", ci(r, "ES"), ci(r, "PS"), ci(r, "NS"), ci(r, "NS_drop"),
                     f"{r['own_E']:.2f}", f"{r['own_P']:.2f}", f"{r['cross_P']:.2f}"] for r in rows]), ""]
    Path(f"{out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
