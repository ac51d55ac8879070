"""`kvmem models`: what `kvmem.load_model` loads offline."""

from __future__ import annotations

import argparse


def cmd_models(args: argparse.Namespace) -> int:
    from kvmem.models import BUILTIN_MODELS

    for name, what in BUILTIN_MODELS.items():
        print(f"{name:14s} {what}")
    print("or a local Hugging Face folder, or an official TransformerLens name (needs the hub)")
    return 0
