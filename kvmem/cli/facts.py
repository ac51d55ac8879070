"""`kvmem facts`: factworld facts as a CounterFact-format JSON file (`kvmem.factworld.counterfact_records`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvmem.errors import InvalidArgumentError
from kvmem.factworld import counterfact_records

from kvmem.cli import common


def cmd_facts(args: argparse.Namespace) -> int:
    out = Path(args.out)
    common.check_out(out.parent)
    records = counterfact_records()
    if args.start >= len(records):
        raise InvalidArgumentError(f"--start {args.start} is past the world's {len(records)} facts.")
    chosen = records[args.start :: args.stride][: args.n]
    common.write_json(out, [r.to_json() for r in chosen])
    common.say(args, f"wrote {len(chosen)} factworld facts (CounterFact format) to {out}")
    return 0
