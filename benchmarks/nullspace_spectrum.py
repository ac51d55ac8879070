"""How much room AlphaEdit's null space leaves at each MEMIT layer: C's spectrum against the threshold.

    python benchmarks/nullspace_spectrum.py --model factworld
    python benchmarks/nullspace_spectrum.py --model gemma-3-270m --stats-tokens 200000

For each layer of the model's MEMIT preset and each threshold: the rank of the null space (eigenvectors
of C = E[k kᵀ] with eigenvalue below it), the share of ordinary text keys' energy inside it,
tr(PC)/tr(C) = E‖Pk‖²/E‖k‖² (what an update confined to range P can still touch of the preserved keys:
0 for a true null space), and for edit requests' keys (subject's last token, averaged over the stress
test's context prefixes): median ‖k‖², ‖Pk‖², ‖Pk‖/‖k‖ and s = kᵀC⁻¹k (MEMIT inserts one key by
s/(λ+s), AlphaEdit by ‖Pk‖²/(α+‖Pk‖²) when it is the only one). C is the stress test's (same corpus
and token count, cached). Results: benchmarks/results/stress/nullspace_<model>.md/.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import add_data_arguments, data_file, provenance, provenance_line, results_dir

THRESHOLDS = ((2e-2, False), (1e-2, False), (1e-3, False), (1e-3, True), (1e-4, True))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="factworld")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: the MEMIT preset's")
    ap.add_argument("--n-requests", type=int, default=50)
    ap.add_argument("--stats-tokens", type=int, default=None)
    ap.add_argument("--prefixes", default="5x3,10x2")
    add_data_arguments(ap, "counterfact", "corpus")
    args = ap.parse_args(argv)

    import torch

    import kvmem
    from kvmem.editing import RomeHparams, context_prefixes, memit_hparams, null_space, second_moment
    from kvmem.editing.memit import _tokenize, context_keys

    torch.set_num_threads(1)
    model = kvmem.load_model(args.model)
    if args.model == "factworld":
        from bench_stress import factworld_setup

        ns = argparse.Namespace(seed=0, n_edits=args.n_requests, n_eval=10)
        requests, _, _, _, corpus, _ = factworld_setup(ns)
    else:
        from kvmem.data import load_counterfact

        requests = [r.request for r in load_counterfact(data_file(args, "counterfact"))[: args.n_requests]]
        corpus = data_file(args, "corpus")
    n_tok = args.stats_tokens or max(20_000, 50 * int(model.cfg.d_mlp))
    layers = args.layers or list(memit_hparams(args.model).layers)
    prefixes = context_prefixes(model, RomeHparams(prefixes=tuple(tuple(int(x) for x in p.split("x"))
                                                                 for p in args.prefixes.split(","))))
    rows = _tokenize(model, requests, prefixes)
    out = []
    for l in layers:
        C = second_moment(model, l, corpus, n_tokens=n_tok, progress=False)
        K = context_keys(model, l, rows)
        s = (K * torch.linalg.solve(C.C, K.T).T).sum(1)
        ev = torch.linalg.eigvalsh(C.C)
        for thr, rel in THRESHOLDS:
            nsp = null_space(C, threshold=thr, relative=rel)
            PK = K @ nsp.P
            out.append({
                "layer": l, "threshold": thr, "relative": rel, "rank": nsp.rank, "d_mlp": nsp.d_mlp,
                "text_energy_in_null": float((nsp.P * C.C).sum() / C.C.trace()),
                "eig_min": float(ev[0]), "eig_max": float(ev[-1]), "trace": float(C.C.trace()),
                "edit_k2_median": float((K ** 2).sum(1).median()), "edit_Pk2_median": float((PK ** 2).sum(1).median()),
                "edit_leak_median": float(nsp.leak(K).median()), "s_median": float(s.median()),
            })
            print(json.dumps(out[-1]), flush=True)
    meta = {**provenance(__file__, argv, "cpu"), "argv": sys.argv[1:] if argv is None else argv, "model": args.model,
            "n_requests": len(requests), "stats_tokens": n_tok, "rows": out}
    dest = results_dir("stress") / f"nullspace_{args.model}"
    Path(f"{dest}.json").write_text(json.dumps(meta, indent=1))
    lines = [f"# AlphaEdit's null space at the MEMIT layers: {args.model}", "",
             f"{provenance_line(meta)} C over {n_tok} tokens (the stress test's); edit keys of {len(requests)} stress-test requests.", "",
             "| layer | threshold | null-space rank / d_mlp | text keys' energy in it, tr(PC)/tr(C) | edit keys: median ‖k‖² | median ‖Pk‖² | median ‖Pk‖/‖k‖ | median s = kᵀC⁻¹k |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out:
        thr = f"{r['threshold']:g}" + (" × λ_max" if r["relative"] else " (absolute)")
        lines.append(f"| {r['layer']} | {thr} | {r['rank']} / {r['d_mlp']} | {r['text_energy_in_null']:.3f} | "
                     f"{r['edit_k2_median']:.3g} | {r['edit_Pk2_median']:.3g} | {r['edit_leak_median']:.3f} | {r['s_median']:.4g} |")
    lines += ["", "C's eigenvalues per layer: " + "; ".join(
        f"layer {r['layer']}: {r['eig_min']:.3g} .. {r['eig_max']:.3g} (trace {r['trace']:.3g})" for r in out[:: len(THRESHOLDS)]), ""]
    Path(f"{dest}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
