"""`kvmem edit`: a ROME edit of each fact of `--facts`, measured with CounterFact's metrics
before and after (`kvmem.evaluation.evaluate_record`)."""

from __future__ import annotations

import argparse
from functools import partial

from kvmem.executors import Work
from kvmem.editing.rome import compute_rome_edit, context_prefixes
from kvmem.evaluation import METRICS, CounterFactEval, counterfact_frame, evaluate_record
from kvmem.pipelines.rome_settings import rome_settings

from kvmem.cli import batch, common, options

# Generation entropy (--generation) on two prompts of 40 tokens: seconds per fact on a CPU.
GEN_PROMPTS, GEN_TOKENS = 2, 40


def _edit_fact(args: argparse.Namespace, state, record) -> dict:
    model, editor = state
    edit = editor(model, record)  # a rejected edit raises here: logged or stops the run (--on-error)
    rows = evaluate_record(model, record, editor=lambda m, r: edit, generation=args.generation,
                           gen_prompts=GEN_PROMPTS, gen_tokens=GEN_TOKENS, seed=args.seed)
    f = record.request
    return {"prompt": f.prompt, "subject": f.subject, "target_true": f.target_true, "target_new": f.target_new,
            "layer": edit.layer, "n_paraphrases": len(record.paraphrase_prompts),
            "n_neighbours": len(record.neighborhood_prompts), "rows": rows}


def _with_editor(model, stats, hp, prefixes) -> tuple:
    """(model, ROME editor): `rome_editor`'s edit, with the driver's context prefixes (every worker
    edits with the same ones, whatever its device samples)."""
    def editor(m, record):
        return compute_rome_edit(m, record.request, stats=stats, hparams=hp, prefixes=prefixes)

    return model, editor


def cmd_edit(args: argparse.Namespace) -> int:
    # a missing --corpus fails before the model loads
    out, model, records, skipped = batch.start(args, need_new=True, check=lambda: options.corpus(args, "kvmem edit"))
    hp = rome_settings(model, layer=args.layer, facts=[r.request for r in records], progress=not args.quiet)
    stats = options.stats(args, model, hp.layer, "kvmem edit")
    settings = {"analysis": "rome_edit", "model": common.fingerprint(model), "layer": hp.layer,
                "prefixes": [list(p) for p in hp.prefixes], "stats": stats.corpus_fingerprint,
                "n_tokens": stats.n_tokens, "generation": args.generation, "seed": args.seed}
    # each worker builds its editor once, on its own model, from the same statistics and settings
    prefixes = context_prefixes(model, hp)
    work = Work(batch.worker_setup(args, model, _with_editor, stats, hp, prefixes), partial(_edit_fact, args),
                local=_with_editor(model, stats, hp, prefixes))
    log = batch.run_and_log(args, model, records, out, "edit", settings, None, work=work)
    facts = batch.logged_rows(log, records, failed=False)
    for fact in facts:
        fact["rows"] = [common.strip_timing(row) for row in fact["rows"]]
    common.write_json(out / "edits.json", facts)
    summary = {"command": "edit", "model": args.model, "facts_file": str(args.facts), "layer": hp.layer,
               "n_edits": len(facts), "skipped_records": skipped, "failed": batch.failures(log, records), "table": None}
    files = []
    if facts:
        evaluation = CounterFactEval(counterfact_frame([row for fact in facts for row in fact["rows"]]))
        paired = evaluation.paired_frame()
        paired.insert(0, "record", [fact["record"] for fact in facts])
        files = common.write_table(out, "edits", paired)
        summary["table"] = evaluation.summary()[list(METRICS)].to_dict(orient="index")
        common.write_figure(out / "edits.png", evaluation.plot())
        common.say(args, evaluation.to_markdown(columns=["S", "ES", "PS", "NS", "EM", "PM", "NM"]))
    common.write_json(out / "summary.json", summary)
    common.say(args, f"wrote {out}/: edits.json, edits.png, {', '.join(files)}, summary.json")
    return 0
