"""Options every model-running command shares: --version, --threads, --device, help texts, the
default output folder per model and command, and input files checked before a model loads."""

from __future__ import annotations

import argparse

import pytest

import kvmem
from kvmem.cli import common, main, runtime
from kvmem.cli.parser import build_parser

MODEL_COMMANDS = ("demo", "trace", "neurons", "edit", "stats", "recall")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvmem {kvmem.__version__}"


def test_every_flag_has_help():
    parser = build_parser()
    empty = [f"{name} {'/'.join(a.option_strings)}" for name, sub in [("kvmem", parser), *_subparsers(parser).items()]
             for a in sub._actions if a.option_strings and not (a.help or "").strip()]
    assert empty == []


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_model_commands_take_threads_and_device(command):
    options = {o for a in _subparsers(build_parser())[command]._actions for o in a.option_strings}
    assert {"--threads", "--device", "--model"} <= options


@pytest.mark.parametrize("command, model, expected", [
    ("demo", "factworld", "kvmem-demo"),
    ("trace", "factworld", "kvmem-trace"),
    ("demo", "gemma-3-270m", "kvmem-demo-gemma-3-270m"),
    ("neurons", "smollm2-135m", "kvmem-neurons-smollm2-135m"),
    ("stats", "/models/My Model/", "kvmem-stats-My-Model"),
])
def test_default_out_per_model_and_command(command, model, expected):
    assert runtime.default_out(command, model) == expected
    argv = [command, "--model", model] + (["--facts", "f.json"] if command == "neurons" else [])
    args = build_parser().parse_args(argv)
    runtime.resolve(args)
    assert args.out == expected
    args = build_parser().parse_args(argv + ["--out", "mine"])
    runtime.resolve(args)
    assert args.out == "mine"  # the README's `kvmem demo --out kvmem-demo` keeps working


def test_threads_are_set(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    args = build_parser().parse_args(["trace", "--threads", "3"])
    runtime.resolve(args)
    assert calls == [3]


@pytest.mark.parametrize("device, message", [("gpu", "not a device name"), ("cuda:99", "cuda:99")])
def test_bad_device_fails_before_the_model_loads(device, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["trace", "--device", device, "--out", str(tmp_path)])
    assert code == 2 and message in capsys.readouterr().err


def test_device_reaches_the_loader(factworld, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(common, "load_model", lambda name, quiet=False, device=None: seen.append(device) or factworld)
    assert main(["recall", "--device", "cpu", "--limit", "2", "--quiet"]) == 0
    assert seen == ["cpu"]


@pytest.mark.parametrize("argv, message", [
    (["recall", "--facts", "{tmp}/missing.json"], "missing.json"),
    (["neurons", "--facts", "{tmp}/missing.json"], "No such facts file"),
    (["stats", "--corpus", "{tmp}/missing.txt"], "No such corpus file"),
    (["demo", "--corpus", "{tmp}/missing.txt"], "No such corpus file"),
])
def test_input_files_checked_before_the_model_loads(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main([a.format(tmp=tmp_path) for a in argv] + ["--out" if argv[0] != "recall" else "--quiet"]
                + ([str(tmp_path / "o")] if argv[0] != "recall" else []))
    assert code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# JSON without bare NaN; "n/a" with the reason


def _strict_json(text: str):
    import json

    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_text_writes_null_for_nan():
    import numpy as np
    import torch

    obj = {"a": float("nan"), "b": [1.5, float("inf"), np.float32("nan")], "c": torch.tensor(2.0), "d": (None, "x")}
    assert _strict_json(common.json_text(obj)) == {"a": None, "b": [1.5, None, None], "c": 2.0, "d": [None, "x"]}


def test_demo_without_paraphrases_says_na_with_the_reason(factworld, tmp_path, capsys, monkeypatch):
    from kvmem.factworld import counterfact_records

    monkeypatch.setattr(common, "load_model", lambda name, quiet=False, device=None: factworld)
    fact = counterfact_records(n=1)[0].request
    code = main(["demo", "--prompt", fact.prompt, "--subject", fact.subject, "--target", fact.target_true,
                 "--new", fact.target_new, "--out", str(tmp_path), "--samples", "2", "--steps", "4",
                 "--n-tokens", "4000", "--cache-dir", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "PS n/a (no paraphrases given)" in out and "NS n/a (no neighbours given)" in out and "nan" not in out
    summary = _strict_json((tmp_path / "summary.json").read_text())
    assert summary["counterfact"]["PS"] is None and summary["counterfact"]["S"] is None
    assert summary["counterfact"]["ES"] == 100.0
    assert summary["not_computed"]["PS"] == "no paraphrases given"
    assert summary["not_computed"]["NS"] == "no neighbours given"
    html = (tmp_path / "report.html").read_text()
    assert "n/a: " in html and "PS: no paraphrases given" in html and ">nan<" not in html
