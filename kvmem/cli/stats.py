"""`kvmem stats`: ROME's second-moment statistics of MLP keys, per layer, cached and logged
(`kvmem.pipelines.moment_survey`)."""

from __future__ import annotations

import argparse

from kvmem.core.weights import check_layer
from kvmem.editing import second_moment
from kvmem.pipelines.moment_survey import MomentSurvey, moment_record
from kvmem.pipelines.rome_settings import rome_settings
from kvmem.runs import RunLog

from kvmem.cli import common, options, runtime


def cmd_stats(args: argparse.Namespace) -> int:
    common.no_display()
    out = common.check_out(args.out)
    corpus, corpus_name = options.corpus(args, "kvmem stats")
    model = common.load_model(args.model, args.quiet, args.device)
    layers = [check_layer(model, l) for l in (args.layers or [rome_settings(model).layer])]
    n_tokens = options.n_tokens(args, model, corpus)
    corpus = options.model_corpus(args, model, corpus)
    settings = {"analysis": "second_moment", "model": common.fingerprint(model), "corpus": corpus_name,
                "n_tokens": n_tokens}
    log = RunLog(out / "stats_log.jsonl", settings, restart=args.restart)
    executor = runtime.executor(args)  # --executor ray: each layer's corpus chunks on Ray workers
    bar = common.progress_bar(args, len(layers), sum(f"layer-{l}" in log for l in layers), "layers", unit="layer")
    try:
        for layer in layers:
            if f"layer-{layer}" in log:
                continue
            sm = second_moment(model, layer, corpus, n_tokens=n_tokens, cache_dir=args.cache_dir, progress=False,
                               executor=executor)
            log.add(f"layer-{layer}", moment_record(sm))
            bar.update()
    finally:
        bar.close()
    survey = MomentSurvey(tuple(common.strip_timing(log[f"layer-{l}"]) for l in layers), corpus_name)
    common.write_figure(out / "stats.png", survey.plot())
    files = common.write_table(out, "stats", survey.to_frame())
    common.write_json(out / "stats.json", {"model": args.model, "corpus": corpus_name, "layers": list(survey.records)})
    for r in survey.records:
        common.say(args, f"layer {r['layer']}: C from {r['n_tokens']} tokens, condition number "
                         f"{r['condition_number']:.3g}, cached at {r['cache_file']}")
    common.say(args, f"wrote {out}/: stats.json, stats.png, {', '.join(files)}")
    return 0
