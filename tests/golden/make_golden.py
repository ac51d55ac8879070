"""Write the golden values in tests/golden/*.pt from the current kvmem (see cases.py for what
each one is). Run from the repository root:

    python tests/golden/make_golden.py            # all cases (Gemma needs the [real] extra)
    python tests/golden/make_golden.py --no-gemma # the factworld cases only

Each file records the kernel signature of the machine that wrote it (cases.kernel_signature); the
tests compare bit for bit only on a machine with the same signature.

Regenerate only on purpose (a deliberate change of numbers), never to make tests/test_golden.py
pass after a refactor that was meant to change no number.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, so that `golden` imports

from golden import cases  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-gemma", action="store_true", help="skip the Gemma-3-270m case")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in tests/test_golden.py: results are compared bit for bit

    import kvmem

    print(f"kvmem from {kvmem.__file__}, torch {torch.__version__}")

    def run(name, fn, *a):
        t = time.perf_counter()
        inputs, values = fn(*a)
        path = cases.save(name, inputs, values)
        print(f"{name}: {time.perf_counter() - t:.1f} s -> {path} ({path.stat().st_size / 1024:.0f} KiB)")

    t = time.perf_counter()
    model, world = cases.load_factworld(), cases.world()
    print(f"factworld load: {time.perf_counter() - t:.1f} s")
    run("trace_factworld", cases.trace_factworld, model, world)
    run("ig_factworld", cases.ig_factworld, model, world)
    t = time.perf_counter()
    stats = cases.factworld_stats(model, world)
    print(f"factworld second moment: {time.perf_counter() - t:.1f} s")
    run("rome_factworld", cases.rome_factworld, model, world, stats)
    run("counterfact_factworld", cases.counterfact_factworld, model, world, stats)
    if not args.no_gemma:
        t = time.perf_counter()
        gemma = cases.load_gemma()
        print(f"gemma-3-270m load: {time.perf_counter() - t:.1f} s")
        run("trace_gemma", cases.trace_gemma, gemma)


if __name__ == "__main__":
    main()
