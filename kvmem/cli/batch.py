"""The batch commands' shared run: read `--facts` (`kvmem.data.read_fact_file`), drop the facts
the model cannot take, and compute each fact not yet in `<out>/<command>_log.jsonl` (a
`kvmem.runs.RunLog`) on `--executor` (serial, or Ray workers: `kvmem.executors`), logging it as
soon as it is done."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from kvmem.core.facts import tokenize_fact
from kvmem.data import CounterFactRecord, read_fact_file
from kvmem.errors import DataFormatError, KvmemError
from kvmem.executors import ItemFailure, Work, run_items
from kvmem.runs import RunLog
from kvmem.tracing import fact_key

from kvmem.cli import common


def key(record: CounterFactRecord) -> str:
    """A fact's key in the run log."""
    return fact_key(record.request)


def _reject(args: argparse.Namespace, index: int, message: str, skipped: list[dict]) -> None:
    where = f"{args.facts} record {index}"
    if args.on_error == "stop":
        raise DataFormatError(f"{where}: {message}. Fix the record, or pass --on-error skip to leave it out.")
    common.warn(f"skipping {where}: {message}")
    skipped.append({"record": index, "error": message})


def read_facts(args: argparse.Namespace, *, need_new: bool = False) -> tuple[list[CounterFactRecord], list[dict]]:
    """The usable records of `--facts` (the first `--limit`), and the ones left out with reasons."""
    records, skipped = read_fact_file(args.facts, on_error=args.on_error, limit=args.limit, need_new=need_new)
    for s in skipped:
        common.warn(f"skipping {args.facts} record {s['record']}: {s['error']}")
    return records, skipped


def check_against_model(
    args: argparse.Namespace, model, records: list[CounterFactRecord], skipped: list[dict], *, need_new: bool = False
) -> list[CounterFactRecord]:
    """Drop (or stop at) facts this model cannot take: ambiguous subject, prompt too long, ..."""
    ok = []
    for rec in records:
        try:
            tokenize_fact(model, rec.request, target="true")
            if need_new:
                tokenize_fact(model, rec.request, target="new")
        except KvmemError as e:
            _reject(args, rec.file_index, str(e), skipped)
            continue
        ok.append(rec)
    if not ok:
        raise DataFormatError(f"None of the facts in {args.facts} fit this model; see the messages above.")
    return ok


def start(args: argparse.Namespace, *, need_new: bool = False, check: Callable[[], Any] | None = None):
    """A batch command's first steps, each failing before the slower next one: the output folder
    checked, `--facts` read, `check()` (more option checks), the model loaded, the facts it cannot
    take dropped. Returns (out folder, model, records, skipped records)."""
    common.no_display()
    out = common.check_out(args.out)
    records, skipped = read_facts(args, need_new=need_new)
    if check is not None:
        check()
    model = common.load_model(args.model, args.quiet, args.device)
    return out, model, check_against_model(args, model, records, skipped, need_new=need_new), skipped


def open_log(args: argparse.Namespace, out: Path, name: str, settings: dict) -> RunLog:
    return RunLog(out / f"{name}_log.jsonl", settings, restart=args.restart)


def worker_setup(args: argparse.Namespace, model, build: Callable | None = None, *extra) -> Callable | None:
    """How a Ray worker builds its state: load `model` by its name (`kvmem.executors.model_source`,
    checked against its weights), then `build(model, *extra)` if given. None for the serial
    executor, which uses the driver's own model and loads nothing."""
    from kvmem.executors import model_setup

    return model_setup(model, getattr(args, "executor", "serial"), build, *extra)


def run_and_log(
    args: argparse.Namespace,
    model,
    records: list[CounterFactRecord],
    out: Path,
    name: str,
    settings: dict,
    compute: Callable[[Any, CounterFactRecord], dict] | None,
    *,
    work: Work | None = None,
) -> RunLog:
    """Compute each fact not yet in `<out>/<name>_log.jsonl` on `--executor` and log it as soon as
    it is done; returns the log. `compute(model, record)`, or `work` (`kvmem.executors.Work`: a
    worker state other than the model, built once per worker).

    A fact whose computation kvmem rejects is logged with its error under `--on-error skip`
    (rerunning does not retry it: the same inputs give the same error) or stops the run.
    """
    from kvmem.cli.runtime import executor

    log = open_log(args, out, name, settings)
    todo = [r for r in records if key(r) not in log]
    if len(records) - len(todo):
        common.say(args, f"resuming: {len(records) - len(todo)} of {len(records)} facts already in {log.path}")
    by_key = {key(r): r for r in records}

    def failed(failure: ItemFailure) -> dict:
        rec = by_key[failure.key]
        if args.on_error == "stop":
            e = failure.exception()
            raise type(e)(f"{args.facts} record {rec.file_index}: {e} (pass --on-error skip to go on)") from None
        common.warn(f"record {rec.file_index} failed: {failure.message}")
        return {"prompt": rec.request.prompt, "subject": rec.subject, "error": str(failure)}

    work = work or Work(worker_setup(args, model), compute, local=model)
    bar = common.progress_bar(args, len(records), len(records) - len(todo), name)
    try:
        run_items([(key(r), r) for r in todo], work, log=log, executor=executor(args), on_failure=failed,
                  on_done=lambda _: bar.update())
    finally:
        bar.close()
    return log


def logged_rows(log: RunLog, records: list[CounterFactRecord], *, failed: bool = True) -> list[dict]:
    """The logged result of each record, in file order, without timings, with its file index
    ("record") and case_id; `failed=False` leaves out the facts whose computation failed."""
    return [common.strip_timing(log[key(r)]) | {"record": r.file_index, "case_id": r.case_id} for r in records
            if key(r) in log and (failed or not log[key(r)].get("error"))]


def failures(log: RunLog, records: list[CounterFactRecord]) -> list[dict]:
    return [{"record": r.file_index, "error": log[key(r)]["error"]} for r in records
            if key(r) in log and log[key(r)].get("error")]
