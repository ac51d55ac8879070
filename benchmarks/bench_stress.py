"""Sequential ROME editing until collapse: ROME's reference-code update vs r-ROME vs edits spread over layers.

    python benchmarks/bench_stress.py --model factworld --n-edits 1000 --every 25
    python benchmarks/bench_stress.py --model gemma-3-270m --n-edits 200 --every 10

On factworld the requests are distinct (subject, relation) facts asked with their first training
template, each given another object of its relation (seeded); `neighborhood` = untouched facts
(never edited) under the same training templates, `known` = other untouched facts under the
held-out paraphrase templates. On a CounterFact file (Gemma) the requests are its records
(duplicates of a subject+relation skipped); the tracked facts are `known_1000` facts the model
answers top-1 about subjects never edited: `neighborhood` = those sharing the relation and the true
object of an edited request (CounterFact's notion of a neighbour: the facts an edit's key is most
likely to also fire on), `known` = the others.

Every run logs to $KVMEM_CACHE/stress_logs/ (JSONL, ~7 kB per factworld edit; --log-dir) and resumes from it when rerun with
the same arguments; results go to benchmarks/results/stress/stress_<model>.json/.md/.csv/.png. C is
taken over `kvmem.factworld.corpus()` on factworld, else over --corpus; the CounterFact and known
facts files come from --counterfact / --known, else from the data folder (--data, $KVMEM_DATA, or
../shared/data beside the repository).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from functools import partial
from pathlib import Path

from common import add_data_arguments, data_file, data_name, peak_rss_mb, provenance, provenance_line, results_dir


def factworld_setup(args):
    from kvmem.core.facts import Fact
    from kvmem.factworld import corpus, shipped_world

    world = shipped_world()
    facts = world.facts("train")
    rng = random.Random(args.seed)
    rng.shuffle(facts)
    edit, rest = facts[: args.n_edits], facts[args.n_edits :]
    requests = []
    for f in edit:
        new = rng.choice([o for o in world.relation(f.relation).objects if o != f.target])
        requests.append(Fact(f.prompt, f.subject, target_true=f.target, target_new=new, relation_id=f.relation))
    n_hold = min(args.n_eval, len(rest) // 2)
    neighborhood = [Fact(f.prompt, f.subject, target_true=f.target, relation_id=f.relation) for f in rest[:n_hold]]
    known = []
    for f in rest[n_hold : 2 * n_hold]:
        p = world.prompts_for(f, "paraphrase")[0]
        known.append(Fact(p.prompt, p.subject, target_true=p.target, relation_id=p.relation))
    gen = [f"{f.subject} is a" for f in rest[:4]]
    return requests, neighborhood, known, gen, corpus(), "factworld (own facts; known = held-out paraphrase templates)"


def counterfact_setup(model, args):
    from kvmem.data import load_counterfact, load_known_facts
    from kvmem.recall import answered_facts

    records = load_counterfact(data_file(args, "counterfact"))
    seen, requests = set(), []
    for r in records:
        key = (r.request.subject, r.request.relation_id or r.request.prompt)
        if key in seen or len(requests) >= args.n_edits:
            continue
        seen.add(key)
        requests.append(r)
    edited = {r.request.subject for r in requests}
    at_risk = {(r.request.relation_id, r.request.target_true.strip()) for r in requests}
    known_all = [f for f in load_known_facts(data_file(args, "known")) if f.subject not in edited]
    answered = answered_facts(model, known_all)
    neighborhood = [f for f in answered if (f.relation_id, f.target_true.strip()) in at_risk][: args.n_eval]
    known = [f for f in answered if (f.relation_id, f.target_true.strip()) not in at_risk][: args.n_eval]
    gen = [r.generation_prompts[0] for r in records[:4] if r.generation_prompts]
    return ([r.request for r in requests], neighborhood, known, gen, data_file(args, "corpus"),
            f"{data_name(args, 'counterfact')}; tracked: known_1000 facts answered top-1 about unedited subjects "
            "(neighbourhood: same relation and true object as an edited request; known: the others)")


def denominator_ratios(model, requests, stats, hp, n: int) -> dict:
    """On the UNEDITED model, for n requests: both update variants share u = C⁻¹k*/‖C⁻¹k*‖ and δ, so
    ‖Λ_rome‖ / ‖Λ_r-rome‖ = (uᵀk*) / (uᵀk_p) exactly: how much the reference code's plain-prompt key in
    the denominator inflates (> 1) or shrinks (< 1) each update, and cos(k_p, k*).

    The ratio does not depend on δ, so v* is not optimised (v_num_grad_steps=1: the keys' forward
    and one loss forward, no backward step); each variant's Edit carries the key its update uses
    (k* or k_p) and u."""
    import dataclasses

    import torch

    from kvmem.editing import compute_rome_edit, context_prefixes
    from kvmem.errors import KvmemError

    prefixes = context_prefixes(model, hp)
    ratios, cosines = [], []
    for req in requests[:n]:
        keys = {}
        try:
            for variant in ("averaged", "prompt"):
                keys[variant] = compute_rome_edit(
                    model, req, stats=stats[hp.layer].C, prefixes=prefixes,
                    hparams=dataclasses.replace(hp, update_key=variant, v_num_grad_steps=1))
        except KvmemError:
            continue
        ea, ep = keys["averaged"], keys["prompt"]
        ratios.append(float((ea.u @ ea.k_star) / (ea.u @ ep.k_star)))
        cosines.append(float(torch.nn.functional.cosine_similarity(ea.k_star, ep.k_star, dim=0)))
    r, c = torch.tensor(ratios, dtype=torch.float64), torch.tensor(cosines, dtype=torch.float64)
    q = lambda t, x: float(t.quantile(x)) if t.numel() else float("nan")  # noqa: E731
    return {"n": len(ratios), "ratio_median": q(r, 0.5), "ratio_p05": q(r, 0.05), "ratio_p95": q(r, 0.95),
            "ratio_max": float(r.max()) if r.numel() else float("nan"), "cos_median": q(c, 0.5), "cos_min": float(c.min()) if c.numel() else float("nan")}


def run_variant(requests, stats, hp, neighborhood, known, gen, args, model, plan):
    """One variant's sequential-edit run (`stress_edits`), resumed from its log when it has one."""
    from kvmem.pipelines.stress import stress_edits

    v, method, layers, log, edit_batch, memit = plan
    return stress_edits(model, requests, method=method, layers=layers, stats=stats, hparams=hp, every=args.every,
                        neighbours=neighborhood, known=known, gen_prompts=gen, gen_tokens=args.gen_tokens,
                        on_conflict="skip", log=log, seed=args.seed, progress=not args.quiet and args.executor == "serial",
                        stop_after=args.stop_after, edit_batch=edit_batch, memit=memit)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="factworld")
    ap.add_argument("--n-edits", type=int, default=1000)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--n-eval", type=int, default=200, help="neighbourhood and known facts tracked")
    ap.add_argument("--variants", nargs="+", default=["rome", "r-rome", "r-rome-spread"],
                    help="rome | r-rome | rome-spread | r-rome-spread, METHOD@LAYER for another single layer, "
                         "memit-bN | alphaedit-bN (batches of N requests over the MEMIT preset's layers)")
    ap.add_argument("--memit-layers", type=int, nargs="+", default=None, help="MEMIT/AlphaEdit layers (default: preset)")
    ap.add_argument("--nullspace-threshold", type=float, default=2e-2, help="AlphaEdit's eigenvalue threshold")
    ap.add_argument("--l2", type=float, default=None, help="AlphaEdit's ridge α (default: preset)")
    ap.add_argument("--memit-lambda", type=float, default=None, help="MEMIT's λ (mom2_update_weight; default: preset)")
    ap.add_argument("--nullspace-relative", action="store_true",
                    help="threshold eigenvalue / largest eigenvalue (AlphaEdit: absolute)")
    ap.add_argument("--layer", type=int, default=None, help="edit layer (default: factworld 1, else the preset)")
    ap.add_argument("--spread-layers", type=int, nargs="+", default=None)
    ap.add_argument("--prefixes", default="5x3,10x2", help="context prefixes LENxCOUNT,...")
    ap.add_argument("--v-steps", type=int, default=20)
    ap.add_argument("--gen-tokens", type=int, default=40)
    ap.add_argument("--stats-tokens", type=int, default=None)
    add_data_arguments(ap, "counterfact", "known", "corpus")
    ap.add_argument("--denominator-sample", type=int, default=50,
                    help="requests for the ROME vs r-ROME denominator comparison on the unedited model (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--log-dir", default=None, help="JSONL run logs (default: $KVMEM_CACHE/stress_logs); rerun resumes")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="apply at most this many new edits per variant, then summarise what the log holds "
                         "(0: summarise a run cut off earlier without adding edits; rerun without it to continue)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--device", default=None, help="torch device (default: TransformerLens's choice, cuda when available)")
    from kvmem.cli.runtime import add_executor_options

    add_executor_options(ap)  # --executor ray: one variant per worker (docs/scaling.md)
    args = ap.parse_args(argv)
    if args.stop_after is not None and args.stop_after < 0:
        ap.error("--stop-after must be 0 or more")

    import torch

    import kvmem
    import dataclasses

    from kvmem.editing import RomeHparams, memit_hparams, rome_hparams, second_moment

    t0 = time.perf_counter()
    model = kvmem.load_model(args.model, device=args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    n_layers = model.cfg.n_layers
    if args.model == "factworld":
        requests, neighborhood, known, gen, corpus, source = factworld_setup(args)
        layer = 1 if args.layer is None else args.layer
        spread = args.spread_layers or [0, 1, 2]
        base = RomeHparams(layer=layer)
    else:
        requests, neighborhood, known, gen, corpus, source = counterfact_setup(model, args)
        base = rome_hparams(model)
        layer = base.layer if args.layer is None else args.layer
        spread = args.spread_layers or list(range(max(0, layer - 2), min(n_layers, layer + 3)))
    prefixes = tuple(tuple(int(x) for x in p.split("x")) for p in args.prefixes.split(","))
    hp = RomeHparams(**{**base.__dict__, "layer": layer, "prefixes": prefixes, "v_num_grad_steps": args.v_steps})
    # MEMIT / AlphaEdit: the model's preset layers and λ, v* settings as the ROME variants' (same
    # contexts and steps, so the methods differ only in how the update is solved)
    memit_hp = memit_hparams(args.model)
    memit_layers = list(args.memit_layers or memit_hp.layers)
    memit_hp = dataclasses.replace(memit_hp, layers=tuple(memit_layers), value=dataclasses.replace(hp, layer=None),
                                   nullspace_threshold=args.nullspace_threshold,
                                   nullspace_relative=args.nullspace_relative,
                                   **({"l2": args.l2} if args.l2 is not None else {}),
                                   **({"mom2_update_weight": args.memit_lambda} if args.memit_lambda is not None else {}))
    n_tok = args.stats_tokens or max(20_000, 50 * int(model.cfg.d_mlp))
    stats = {}
    extra = {int(v.partition("@")[2]) for v in args.variants if "@" in v}
    if any(v.split("-b")[0] in ("memit", "alphaedit") for v in args.variants):
        extra |= set(memit_layers)
    for l in sorted(set(spread) | {layer} | extra):
        stats[l] = second_moment(model, l, corpus, n_tokens=n_tok, progress=not args.quiet)
    setup_s = time.perf_counter() - t0
    denominators = denominator_ratios(model, requests, stats, hp, args.denominator_sample) if args.denominator_sample else {}
    print("denominator ratio ROME / r-ROME on the unedited model:", denominators, flush=True)

    out = Path(args.out or results_dir("stress") / f"stress_{args.model.replace('/', '_')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    from kvmem.config import cache_root

    logs = Path(args.log_dir) if args.log_dir else cache_root() / "stress_logs"
    results = {}
    frames = []
    plans = {}
    for v in args.variants:
        name, _, at = v.partition("@")
        batched = name.split("-b")[0] in ("memit", "alphaedit")
        if batched:  # memit-b10, alphaedit-b1: the method and its batch size, over the MEMIT layers
            method, edit_batch = name.split("-b")[0], int(name.split("-b")[1])
            layers = memit_layers
        else:
            method, edit_batch = name.replace("-spread", ""), 1
            layers = spread if name.endswith("-spread") else (int(at) if at else layer)
        plans[v] = (method, layers, logs / f"{out.name}_{v}_n{len(requests)}_s{args.seed}.jsonl", edit_batch,
                    memit_hp if batched else None)
        print(f"== {v}: layers {layers}, {len(requests)} edits, log {plans[v][2]}", flush=True)
    # the variants are independent sequential runs: on --executor ray each runs on its own worker
    # (which writes its stress log; a variant whose worker dies resumes from that log on another)
    from kvmem.cli.runtime import executor as executor_of
    from kvmem.executors import Work, model_setup, run_items

    ex = executor_of(args)
    run = partial(run_variant, requests, stats, hp, neighborhood, known, gen, args)
    done = run_items([(v, (v, *plans[v])) for v in args.variants], Work(model_setup(model, ex), run, local=model),
                     executor=ex)
    for v in args.variants:
        res, log = done[v], plans[v][2]
        df = res.to_frame()
        df.insert(0, "variant", v)
        frames.append(df)
        st = res.steps_frame()
        norms = st["update_norm"].dropna() if "update_norm" in st else st.iloc[:0]
        results[v] = {
            "layers": list(res.layers), "n_applied": res.n_applied, "n_skipped": res.n_skipped,
            "n_done": len(res.steps),  # < n_requests: a run cut off (--stop-after), summarised from its log
            "collapse_step": res.collapse_step, "collapse_reason": res.collapse_reason,
            "seconds": res.seconds, "resumed_from": res.resumed_from, "baseline": res.baseline,
            "final": res.checkpoints[-1],
            "update_norm_median": float(norms.median()) if len(norms) else None,
            "update_norm_max": float(norms.max()) if len(norms) else None,
            "update_norm_p99": float(norms.quantile(0.99)) if len(norms) else None,
            "edit_s_mean": float(st["seconds"].dropna().mean()) if "seconds" in st else None,
            "log": str(log),
        }
        print(json.dumps({k: results[v][k] for k in ("n_applied", "collapse_step", "collapse_reason",
                                                      "update_norm_median", "update_norm_max")}), flush=True)
        fig = res.plot(title=f"{args.model}: {v}")
        fig.savefig(f"{out}_{v}.png", dpi=110)

    import pandas as pd

    table = pd.concat(frames, ignore_index=True)
    table.to_csv(f"{out}.csv", index=False)
    compare_figure(table, results, f"{out}.png", title=f"{args.model}: {len(requests)} sequential edits")
    meta = {**provenance(__file__, argv, model.cfg.device), "argv": sys.argv[1:] if argv is None else argv,
            "model": args.model, "source": source,
            "n_requests": len(requests), "n_neighborhood": len(neighborhood), "n_known": len(known),
            "hparams": {"layer": layer, "spread": spread, "prefixes": prefixes, "v_num_grad_steps": args.v_steps},
            "memit": {k: v for k, v in dataclasses.asdict(memit_hp).items() if k != "value"},
            "stats_tokens": n_tok, "setup_s": setup_s, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if str(model.cfg.device).startswith("cuda") else None,
            "peak_rss_mb": peak_rss_mb(), "results": results, "denominators": denominators,
            "csv": f"{out.name}.csv", "png": f"{out.name}.png (variants side by side), {out.name}_<variant>.png"}
    Path(f"{out}.json").write_text(json.dumps(meta, indent=1, default=str))
    Path(f"{out}.md").write_text(markdown(meta, table))
    print(Path(f"{out}.md").read_text())


def compare_figure(table, results: dict, path: str, title: str) -> None:
    """The variants on shared axes: retention, neighbourhood and known-fact accuracy, generation
    entropy against the number of edits (each variant's collapse dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = (("retention", "retention of earlier edits"), ("neighborhood_acc", "neighbourhood acc."),
            ("known_acc", "known-fact acc."), ("gen_entropy", "generation entropy"))
    fig, axes = plt.subplots(1, len(cols), figsize=(16, 3.4))
    for j, v in enumerate(results):
        sub = table[table["variant"] == v]
        for ax, (col, name) in zip(axes, cols):
            ax.plot(sub["step"], sub[col], color=f"C{j}", label=v, marker=".", markersize=3)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("edits applied")
            if results[v]["collapse_step"] is not None:
                ax.axvline(results[v]["collapse_step"], color=f"C{j}", linestyle=":", linewidth=1)
    for ax in axes[:3]:
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _g(x, fmt: str = ".3g") -> str:
    return "–" if x is None or x != x else format(x, fmt)


def markdown(meta, table) -> str:
    lines = [f"# Sequential editing stress test: {meta['model']}", "",
             f"{provenance_line(meta)} Requests: {meta['n_requests']} from {meta['source']}; "
             f"neighbourhood {meta['n_neighborhood']} and known {meta['n_known']} untouched facts; edit layer "
             f"{meta['hparams']['layer']}, spread over {meta['hparams']['spread']}; contexts "
             f"{meta['hparams']['prefixes']}; C from {meta['stats_tokens']} tokens."
             + (f" MEMIT/AlphaEdit (memit-bN, alphaedit-bN: batches of N): layers {list(meta['memit']['layers'])}, "
                f"λ {meta['memit']['mom2_update_weight']:g}, null space: eigenvalues of C below "
                f"{meta['memit']['nullspace_threshold']:g}{' × the largest' if meta['memit']['nullspace_relative'] else ''}, "
                f"α {meta['memit']['l2']:g}." if meta.get("memit") and any(v.split("-b")[0] in ("memit", "alphaedit")
                                                                          for v in meta["results"]) else ""), "",
             "| variant | edits applied | skipped | collapse at | retention | neighbourhood acc | known acc | gen. entropy | "
             "‖ΔW‖ median | ‖ΔW‖ max | max ‖W−W⁰‖/‖W⁰‖ | s/edit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cut = {v: r["n_done"] for v, r in meta["results"].items() if r.get("n_done", meta["n_requests"]) < meta["n_requests"]}
    for v, r in meta["results"].items():
        b, f = r["baseline"], r["final"]
        dmax = max(f["w_delta_rel"].values()) if f["w_delta_rel"] else 0.0
        lines.append(
            f"| {v} (layers {r['layers']}){' **partial**' if v in cut else ''} | {r['n_applied']} | {r['n_skipped']} | {r['collapse_step']} | "
            f"{f['retention']:.3f} | {b['neighborhood_acc']:.3f} → {f['neighborhood_acc']:.3f} | "
            f"{b['known_acc']:.3f} → {f['known_acc']:.3f} | {b['gen_entropy']:.2f} → {f['gen_entropy']:.2f} | "
            f"{_g(r['update_norm_median'])} | {_g(r['update_norm_max'])} | {dmax:.3g} | {_g(r['edit_s_mean'], '.2f')} |")
    if cut:
        lines += ["", "**Partial runs**: " + "; ".join(f"{v} stopped after {n} of {meta['n_requests']} requests, its figures "
                                                   f"from the checkpoint at step {meta['results'][v]['final']['step']}"
                                                   for v, n in cut.items())
                  + " (cut off; its log resumes: rerun the same command without --stop-after)."]
    d = meta.get("denominators") or {}
    if d:
        lines += ["", f"Update size, ROME vs r-ROME, on the unedited model ({d['n']} requests at layer "
                  f"{meta['hparams']['layer']}): ‖Λ_ROME‖ / ‖Λ_r-ROME‖ = (uᵀk*)/(uᵀk_p) has median {d['ratio_median']:.3f} "
                  f"(5–95%: {d['ratio_p05']:.3f}–{d['ratio_p95']:.3f}, max {d['ratio_max']:.3f}); cos(k_p, k*) median "
                  f"{d['cos_median']:.3f}, min {d['cos_min']:.3f}. (k_p: the plain prompt's key; k*: averaged over the prefixed contexts.)"]
    lines += ["", "Retention = share of all edits applied so far whose prompt answers target_new top-1 at the end; "
              "accuracies are top-1 on the first target token; collapse = first checkpoint where known-fact "
              "accuracy or generation entropy falls below half its unedited value.", "",
              f"Per-checkpoint values: `{meta['csv']}`; figures: `{meta['png']}`.", ""]
    # a compact trajectory: retention / known acc every ~10% of the run
    for v in meta["results"]:
        sub = table[table["variant"] == v]
        last = int(sub["step"].max())
        early = [x for x in (0, 10, 20, 30, 40, 50, 60, 80, 100, 150) if x <= last]
        wanted = set(early) | {round(i * last / 10) for i in range(11)} | {last}
        rows = sub[sub["step"].isin(wanted)]
        lines += [f"### {v}", "", "| edits | retention | neighbourhood acc | known acc | gen. entropy |", "|---|---|---|---|---|"]
        for _, r in rows.iterrows():
            lines.append(f"| {int(r['step'])} | {r['retention']:.3f} | {r['neighborhood_acc']:.3f} | "
                         f"{r['known_acc']:.3f} | {r['gen_entropy']:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
