"""The `kvmem` command: batch jobs from the shell.

    kvmem models                                  # what can be loaded offline
    kvmem trace                                   # causal trace of a factworld fact -> kvmem-trace/
    kvmem trace --model gemma-3-270m --prompt "The Eiffel Tower is located in the city of" \
        --subject "The Eiffel Tower" --target Paris
    kvmem recall --model gemma-3-270m --facts ../shared/data/known_1000.json --limit 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvmem.errors import KvmemError


def _fact_from_args(args, model_name: str):
    from kvmem.prompts import Fact

    if args.prompt:
        if not args.subject:
            raise KvmemError("--prompt needs --subject (the subject as written in the prompt).")
        return Fact(args.prompt, args.subject, target_true=args.target)
    if model_name == "factworld":
        from kvmem.factworld import shipped_world

        w = shipped_world().facts("train")[args.fact_index]
        return Fact(w.prompt, w.subject, target_true=w.target_true, relation_id=w.relation_id)
    from kvmem.data import builtin_facts

    return builtin_facts()[args.fact_index]


def cmd_models(args) -> int:
    from kvmem.models import BUILTIN_MODELS

    for name, what in BUILTIN_MODELS.items():
        print(f"{name:14s} {what}")
    print("or a local Hugging Face folder, or an official TransformerLens name (needs the hub)")
    return 0


def cmd_trace(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import kvmem
    from kvmem.tracing import trace_all

    t0 = time.perf_counter()
    model = kvmem.load_model(args.model)
    fact = _fact_from_args(args, args.model)
    window = args.window or max(1, min(10, model.cfg.n_layers // 2))
    traces = trace_all(model, fact, window=window, samples=args.samples, seed=args.seed, progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = traces.plot(title=f"{fact.prompt!r} -> {traces.traces[0].answer!r}")
    fig.savefig(out / "trace.png", dpi=120, bbox_inches="tight")
    traces.show().save(out / "trace.html")
    traces.to_frame().to_csv(out / "trace.csv", index=False)
    summary = {"model": args.model, "prompt": fact.prompt, "subject": fact.subject, "answer": traces.traces[0].answer,
               "p_clean": traces.p_clean, "p_corrupt": traces.p_corrupt, "seconds": round(time.perf_counter() - t0, 2)}
    for t in traces:
        ie = t.indirect_effect
        layer, pos = divmod(int(ie.argmax()), ie.shape[1])
        summary[f"{t.kind}_peak"] = {"layer": layer, "token": t.str_tokens[pos], "pos": pos, "indirect_effect": float(ie.max())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}/trace.png, trace.html, trace.csv, summary.json")
    return 0


def cmd_recall(args) -> int:
    import kvmem
    from kvmem.data import builtin_facts, load_known_facts
    from kvmem.recall import fact_recall

    model = kvmem.load_model(args.model)
    facts = load_known_facts(args.facts, limit=args.limit) if args.facts else builtin_facts()
    res = fact_recall(model, facts, batch_size=args.batch_size, progress=not args.quiet)
    print(f"{len(facts)} facts: top-1 {res.top_k(1):.1%}, top-5 {res.top_k(5):.1%}")
    if args.csv:
        res.to_frame().to_csv(args.csv, index=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmem", description="MLP layers as key-value memories of facts.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the models kvmem loads offline").set_defaults(func=cmd_models)

    t = sub.add_parser("trace", help="causal trace (resid/mlp/attn) of one fact")
    t.add_argument("--model", default="factworld")
    t.add_argument("--prompt")
    t.add_argument("--subject")
    t.add_argument("--target", help="expected answer (default: the model's own top token)")
    t.add_argument("--fact-index", type=int, default=0, help="which built-in fact when no --prompt")
    t.add_argument("--window", type=int, default=None, help="mlp/attn window (default: 10, or n_layers//2 if smaller)")
    t.add_argument("--samples", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="kvmem-trace")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_trace)

    r = sub.add_parser("recall", help="top-1/top-5 recall of facts (known_1000.json format)")
    r.add_argument("--model", default="factworld")
    r.add_argument("--facts", help="path to known_1000.json (default: kvmem's built-in facts)")
    r.add_argument("--limit", type=int)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--csv")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_recall)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KvmemError as e:
        print(f"kvmem: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
