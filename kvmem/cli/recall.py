"""`kvmem recall`: top-1 / top-5 recall of facts (`kvmem.fact_recall`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvmem.data import builtin_facts, load_known_facts
from kvmem.recall import fact_recall

from kvmem.cli import common


def cmd_recall(args: argparse.Namespace) -> int:
    if args.csv:
        common.check_out(Path(args.csv).parent)
    facts = load_known_facts(args.facts, limit=args.limit) if args.facts else builtin_facts()  # before the model
    model = common.load_model(args.model, args.quiet, args.device)
    res = fact_recall(model, facts, batch_size=args.batch_size, progress=not args.quiet)
    print(f"{len(facts)} facts: top-1 {res.top_k(1):.1%}, top-5 {res.top_k(5):.1%}")
    if args.csv:
        common.write(Path(args.csv), res.to_frame().to_csv(index=False))
    return 0
