"""`kvmem edit`: a ROME edit of each fact of `--facts`, measured with CounterFact's metrics
before and after (`kvmem.evaluation.evaluate_record`)."""

from __future__ import annotations

import argparse
from functools import partial

from dataclasses import replace

from kvmem.editing.memit import memit_hparams
from kvmem.editing.nullspace import null_space
from kvmem.editing.rome import context_prefixes
from kvmem.errors import InvalidArgumentError
from kvmem.evaluation import (METRICS, CounterFactEval, batch_editor, check_interference, counterfact_frame,
                              evaluate_record, rome_editor)
from kvmem.executors import Work
from kvmem.pipelines.rome_settings import rome_settings

from kvmem.cli import batch, common, options

# Generation entropy (--generation) on two prompts of 40 tokens: seconds per fact on a CPU.
GEN_PROMPTS, GEN_TOKENS = 2, 40
LABELS = {"rome": "ROME", "memit": "MEMIT", "alphaedit": "AlphaEdit"}  # the condition column


def _edit_fact(args: argparse.Namespace, state, record) -> dict:
    model, editor, safe = state
    edit = editor(model, record)  # a rejected edit raises here: logged or stops the run (--on-error)
    # ROME: the predicted interference, kept with the fact (a warning alone is lost on Ray workers);
    # --safe refuses here, which is logged or stops the run like any rejected edit
    check = check_interference(model, record, edit, safe=safe) if safe is not None else None
    rows = evaluate_record(model, record, editor=lambda m, r: edit, generation=args.generation,
                           method=_label(args),
                           gen_prompts=GEN_PROMPTS, gen_tokens=GEN_TOKENS, seed=args.seed)
    f = record.request
    return {"prompt": f.prompt, "subject": f.subject, "target_true": f.target_true, "target_new": f.target_new,
            "layer": edit.layers[-1], "layers": list(edit.layers), "n_paraphrases": len(record.paraphrase_prompts),
            "n_neighbours": len(record.neighborhood_prompts), "rows": rows,
            "interference": None if check is None else {"risk": check.risk, "unsafe": check.unsafe,
                                                         "n_prompts": len(check.effects)}}


def _label(args: argparse.Namespace) -> str:
    """The condition column of the method's rows (ROME under the null-space constraint has its own)."""
    method = getattr(args, "method", "rome")
    return LABELS[method] + (" (null space)" if method == "rome" and getattr(args, "null_space", None) else "")


def _rome_state(model, stats, hp, prefixes, safe, null_space=None) -> tuple:
    """(model, ROME editor, `safe`) with the driver's context prefixes (every worker edits with the
    same ones, whatever its device samples); `safe` as `kvmem.evaluation.check_interference`'s;
    `null_space`: AlphaEdit's constraint on every update (the driver's, from the same C)."""
    return model, rome_editor(model, stats=stats, hparams=hp, prefixes=prefixes, null_space=null_space), safe


def cmd_edit(args: argparse.Namespace) -> int:
    # a missing --corpus fails before the model loads
    out, model, records, skipped = batch.start(args, need_new=True, check=lambda: options.corpus(args, "kvmem edit"))
    hp = rome_settings(model, layer=args.layer, facts=[r.request for r in records], progress=not args.quiet)
    method = getattr(args, "method", "rome")
    if method == "rome":
        if args.batch_size != 1:
            raise InvalidArgumentError("--batch-size goes with --method memit or alphaedit (ROME edits one fact).")
        stats = options.stats(args, model, hp.layer, "kvmem edit")
        layers = [hp.layer]
        ns = None if args.null_space is None else null_space(stats, threshold=args.null_space)
    else:  # one MEMIT/AlphaEdit edit per batch of --batch-size records, each record scored with its batch's edit
        if getattr(args, "executor", "serial") != "serial":
            raise InvalidArgumentError("--method memit/alphaedit makes one edit per batch of facts in order; run it with "
                                       "--executor serial (the default).")
        if args.safe:
            raise InvalidArgumentError("--safe checks ROME edits (kvmem.predict_interference predicts a rank-one "
                                       "update's interference); leave it out with --method memit or alphaedit.")
        if method == "memit" and args.null_space is not None:
            raise InvalidArgumentError("--null-space constrains ROME's or AlphaEdit's updates; MEMIT with the "
                                       "constraint is --method alphaedit.")
        mhp = memit_hparams(model, null_space=method == "alphaedit")
        if args.null_space is not None:
            mhp = replace(mhp, nullspace_threshold=args.null_space)
        mhp = replace(mhp, value=replace(mhp.value, prefixes=hp.prefixes))
        if args.layer is not None:
            mhp = replace(mhp, layers=(args.layer,))
        layers = list(mhp.layers)
        per_layer = {l: options.stats(args, model, l, "kvmem edit") for l in layers}
        stats = per_layer[layers[-1]]
        # each batch's edit is kept in the output folder: a rerun (after a stop while scoring) reads it
        # back; --restart fits them again
        saved = out / "batch_edits"
        if args.restart and saved.exists():
            for f in saved.glob("batch_*.safetensors"):
                f.unlink()
        editor = batch_editor(model, records, stats=per_layer, hparams=mhp, batch_size=args.batch_size,
                              progress=not args.quiet, save_dir=saved)
    settings = {"analysis": "rome_edit", "model": common.fingerprint(model), "layer": hp.layer,
                "prefixes": [list(p) for p in hp.prefixes], "stats": stats.corpus_fingerprint,
                "n_tokens": stats.n_tokens, "generation": args.generation, "seed": args.seed}
    if method != "rome":  # only then, so that logs of ROME runs keep resuming
        settings.update(method=method, batch_size=args.batch_size, layers=layers)
    if args.null_space is not None:
        settings.update(null_space=args.null_space)
    if method == "rome":  # each worker builds its editor once, on its own model, with the driver's prefixes
        state = (_rome_state, stats, hp, context_prefixes(model, hp), args.safe, ns)
        work = Work(batch.worker_setup(args, model, *state), partial(_edit_fact, args), local=state[0](model, *state[1:]))
    else:
        work = Work(None, partial(_edit_fact, args), local=(model, editor, None))
    log = batch.run_and_log(args, model, records, out, "edit", settings, None, work=work)
    facts = batch.logged_rows(log, records, failed=False)
    for fact in facts:
        fact["rows"] = [common.strip_timing(row) for row in fact["rows"]]
    common.write_json(out / "edits.json", facts)
    summary = {"command": "edit", "model": args.model, "facts_file": str(args.facts), "layer": layers[-1],
               "method": method, "layers": layers, "batch_size": args.batch_size,
               "null_space": None if args.null_space is None else (
                   {"threshold": ns.threshold, "rank": ns.rank, "d_mlp": ns.d_mlp} if method == "rome"
                   else {"threshold": args.null_space}),
               "n_edits": len(facts), "skipped_records": skipped, "failed": batch.failures(log, records), "table": None,
               "predicted_unsafe": sum(bool((f.get("interference") or {}).get("unsafe")) for f in facts)}
    files = []
    if facts:
        evaluation = CounterFactEval(counterfact_frame([row for fact in facts for row in fact["rows"]]))
        paired = evaluation.paired_frame(_label(args))
        paired.insert(0, "record", [fact["record"] for fact in facts])
        files = common.write_table(out, "edits", paired)
        summary["table"] = evaluation.summary()[list(METRICS)].to_dict(orient="index")
        common.write_figure(out / "edits.png", evaluation.plot())
        common.say(args, evaluation.to_markdown(columns=["S", "ES", "PS", "NS", "EM", "PM", "NM"]))
    common.write_json(out / "summary.json", summary)
    common.say(args, f"wrote {out}/: edits.json, edits.png, {', '.join(files)}, summary.json")
    return 0
