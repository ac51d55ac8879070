"""The `kvmem` command: the demo, and batch jobs over fact files from the shell.

    kvmem demo                                    # one factworld fact, four analyses -> kvmem-demo/report.html
    kvmem models                                  # what can be loaded offline
    kvmem trace                                   # causal trace of a factworld fact -> kvmem-trace/
    kvmem trace --model gemma-3-270m --prompt "The Eiffel Tower is located in the city of" \
        --subject "The Eiffel Tower" --target Paris
    kvmem facts --out facts.json --n 20           # factworld facts as a CounterFact-format file
    kvmem trace --facts facts.json --out runs/trace      # average indirect effect over a data set
    kvmem neurons --facts facts.json --out runs/neurons  # knowledge neurons per fact
    kvmem edit --facts facts.json --out runs/edit        # ROME edit + CounterFact metrics per fact
    kvmem stats --layers 1 --out runs/stats              # second-moment statistics for ROME
    kvmem recall --model gemma-3-270m --facts ../shared/data/known_1000.json --limit 200

Batch commands read known_1000 records, CounterFact records or a simple list of
`{"prompt", "subject", "target", "target_new"?, "paraphrases"?, "neighbors"?}`; they log each
finished fact to `<out>/<command>_log.jsonl` and, run again with the same settings, skip the facts
already done. A malformed record is reported by its index; `--on-error skip` goes on without it.
Every output file is written to a temporary file and renamed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from kvmem.errors import DataFormatError, InvalidArgumentError, KvmemError

# --------------------------------------------------------------------------------------------
# Small helpers


def _say(args: argparse.Namespace, *parts: Any) -> None:
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


def _warn(*parts: Any) -> None:
    print("kvmem:", *parts, file=sys.stderr, flush=True)


def _agg() -> None:
    import matplotlib

    matplotlib.use("Agg")  # batch jobs have no display


def _check_out(out: str | Path) -> Path:
    """Fail before any work when the output folder cannot be written."""
    out = Path(out)
    probe = out / f".kvmem-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InvalidArgumentError(
            f"Cannot write to the output folder {out} ({e.strerror or e}); choose a writable --out."
        ) from None
    return out


def _write(path: Path, data: str | bytes) -> None:
    from kvmem.runs import write_atomic

    write_atomic(path, data)


def _write_json(path: Path, obj: Any) -> None:
    _write(path, json.dumps(obj, indent=1, default=float) + "\n")


def _write_figure(path: Path, fig) -> None:
    from kvmem.viz.report import figure_png

    _write(path, figure_png(fig))


def _write_table(out: Path, stem: str, frame) -> list[str]:
    """CSV always; Parquet too when pyarrow is installed (it is not a kvmem dependency)."""
    written = [f"{stem}.csv"]
    _write(out / f"{stem}.csv", frame.to_csv(index=False))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return written
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    _write(out / f"{stem}.parquet", buf.getvalue())
    return written + [f"{stem}.parquet"]


def _progress(args: argparse.Namespace, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="fact", disable=args.quiet, file=sys.stderr)


def _whole_number(text: str, minimum: int, bound: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1, "at least 1")


def _nonneg_int(text: str) -> int:
    return _whole_number(text, 0, "0 or more")


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 1,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one layer")
    return values


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("resid", "mlp", "attn")]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"kinds are resid, mlp, attn (comma-separated), got {text!r}")
    return kinds


def _load_model(name: str, quiet: bool = False):
    import contextlib

    import kvmem

    if not quiet:
        return kvmem.load_model(name)
    # TransformerLens and transformers print loading chatter; --quiet means quiet (errors still raise).
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return kvmem.load_model(name)


def _fingerprint(model) -> str:
    from kvmem.editing.fingerprint import model_fingerprint

    return model_fingerprint(model)


# --------------------------------------------------------------------------------------------
# Fact files


@dataclass(frozen=True)
class FactItem:
    """One usable record of a fact file: the fact, its test prompts, where it came from."""

    index: int
    fact: Any  # kvmem.Fact
    paraphrases: tuple[str, ...] = ()
    neighbors: tuple[str, ...] = ()
    generation: tuple[str, ...] = ()
    case_id: int | None = None

    @property
    def key(self) -> str:
        from kvmem.tracing import fact_key

        return fact_key(self.fact)

    def counterfact(self):
        from kvmem.data import CounterFactRecord

        f = self.fact
        return CounterFactRecord(
            case_id=self.case_id if self.case_id is not None else self.index,
            request=f,
            template=f.prompt.replace(f.subject, "{}", 1),
            paraphrase_prompts=self.paraphrases,
            neighborhood_prompts=self.neighbors,
            attribute_prompts=(),
            generation_prompts=self.generation,
        )


def _strings(record: dict, key: str) -> tuple[str, ...]:
    value = record.get(key, ())
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataFormatError(f"field {key!r} must be a list of strings")
    return tuple(value)


def _target_str(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):  # CounterFact: {"str": ..., "id": ...}
        value = value.get("str")
    if not isinstance(value, str):
        raise DataFormatError(f"field {name!r} must be a string (or CounterFact's {{\"str\": ...}})")
    return value


def parse_record(record: Any, index: int) -> FactItem:
    """A fact-file record (CounterFact, known_1000 or the simple format) as a `FactItem`."""
    from kvmem.core.facts import Fact

    if not isinstance(record, dict):
        raise DataFormatError(f"expected a JSON object, got {type(record).__name__}")
    if "requested_rewrite" in record:  # CounterFact
        rw = record["requested_rewrite"]
        if not isinstance(rw, dict):
            raise DataFormatError("requested_rewrite must be an object")
        missing = [k for k in ("prompt", "subject", "target_true", "target_new") if k not in rw]
        if missing:
            raise DataFormatError(f"requested_rewrite lacks {missing}")
        if not isinstance(rw["prompt"], str) or not isinstance(rw["subject"], str):
            raise DataFormatError("requested_rewrite.prompt and .subject must be strings")
        fact = Fact.from_template(
            rw["prompt"], rw["subject"], target_true=_target_str(rw["target_true"], "target_true"),
            target_new=_target_str(rw["target_new"], "target_new"), relation_id=rw.get("relation_id"),
        )
        return FactItem(
            index, fact, _strings(record, "paraphrase_prompts"), _strings(record, "neighborhood_prompts"),
            _strings(record, "generation_prompts"), record.get("case_id"),
        )
    missing = [k for k in ("prompt", "subject") if k not in record]
    target = record.get("target", record.get("target_true", record.get("attribute")))
    if missing or target is None:
        missing += [] if target is not None else ["target (or attribute / target_true)"]
        raise DataFormatError(f"lacks field(s) {missing}; found {sorted(record)[:8]}")
    prompt, subject = record["prompt"], record["subject"]
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise DataFormatError("prompt and subject must be strings")
    if "{}" in prompt:
        prompt = prompt.replace("{}", subject, 1)
    fact = Fact(
        prompt, subject, target_true=_target_str(target, "target"),
        target_new=_target_str(record.get("target_new"), "target_new"), relation_id=record.get("relation_id"),
    )
    return FactItem(
        index, fact, _strings(record, "paraphrases"), _strings(record, "neighbors"),
        _strings(record, "generation_prompts"), record.get("case_id", record.get("known_id")),
    )


def _reject(args: argparse.Namespace, path: str, index: int, message: str, skipped: list[dict]) -> None:
    where = f"{path} record {index}"
    if args.on_error == "stop":
        raise DataFormatError(f"{where}: {message}. Fix the record, or pass --on-error skip to leave it out.")
    _warn(f"skipping {where}: {message}")
    skipped.append({"record": index, "error": message})


def read_facts(args: argparse.Namespace, need_new: bool = False) -> tuple[list[FactItem], list[dict]]:
    """The usable records of `--facts` (first `--limit`) and the ones skipped, with reasons."""
    path = Path(args.facts)
    if not path.is_file():
        raise DataFormatError(f"No such facts file: {path}. Pass --facts PATH to a JSON file of facts.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path} is not valid JSON ({e}); pass a JSON list of fact records.") from None
    if isinstance(data, dict) and isinstance(data.get("facts"), list):
        data = data["facts"]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of fact records, got {type(data).__name__}.")
    if args.limit is not None:
        data = data[: args.limit]
    items, skipped, seen = [], [], set()
    for i, rec in enumerate(data):
        try:
            item = parse_record(rec, i)
        except KvmemError as e:
            _reject(args, str(path), i, str(e), skipped)
            continue
        if need_new and item.fact.target_new is None:
            _reject(args, str(path), i, "has no target_new (the object an edit writes)", skipped)
            continue
        if item.key in seen:  # not malformed (known_1000 has one): a fact is computed once
            _warn(f"skipping {path} record {i}: it repeats an earlier fact")
            skipped.append({"record": i, "error": "repeats an earlier fact"})
            continue
        seen.add(item.key)
        items.append(item)
    if not items:
        raise DataFormatError(f"{path} has no usable facts ({len(skipped)} skipped); see the messages above.")
    return items, skipped


def check_against_model(
    args: argparse.Namespace, model, items: list[FactItem], skipped: list[dict], need_new: bool = False
) -> list[FactItem]:
    """Drop (or stop at) facts this model cannot take: ambiguous subject, prompt too long, ..."""
    from kvmem.core.facts import tokenize_fact

    ok = []
    for item in items:
        try:
            tokenize_fact(model, item.fact, target="true")
            if need_new:
                tokenize_fact(model, item.fact, target="new")
        except KvmemError as e:
            _reject(args, args.facts, item.index, str(e), skipped)
            continue
        ok.append(item)
    if not ok:
        raise DataFormatError(f"None of the facts in {args.facts} fit this model; see the messages above.")
    return ok


def _open_log(args: argparse.Namespace, out: Path, name: str, settings: dict):
    from kvmem.runs import RunLog

    return RunLog(out / f"{name}_log.jsonl", settings, restart=args.restart)


def _strip_timing(record: dict) -> dict:
    """Results files hold what was computed, not how long it took: a resumed run writes the same."""
    return {k: v for k, v in record.items() if k != "seconds"}


# --------------------------------------------------------------------------------------------
# Factworld helpers


def _factworld_new_object(world, wfact) -> str:
    """A deterministic false object of the same relation (the edit's target_new)."""
    objects = world.relation(wfact.relation).objects
    i = objects.index(wfact.target)
    return objects[(i + 1) % len(objects)]


def factworld_item(world, wfact, index: int, n_neighbors: int = 5) -> FactItem:
    """A fact-world fact as a CounterFact-style item: held-out templates as paraphrases, other
    subjects with the same object as neighbours."""
    from kvmem.core.facts import Fact

    fact = Fact(wfact.prompt, wfact.subject, target_true=wfact.target, target_new=_factworld_new_object(world, wfact),
                relation_id=wfact.relation)
    return FactItem(
        index, fact,
        tuple(p.prompt for p in world.prompts_for(wfact, "paraphrase")),
        tuple(n.prompt for n in world.neighbours(wfact, k=n_neighbors, same_object=True)),
        (), index,
    )


def factworld_sentences(world) -> list[str]:
    """The world's training sentences, shuffled with a fixed seed (ROME's 'ordinary text' here)."""
    import random

    sents = [world.sentence(p.subject, p.relation, p.template) for p in world.all_prompts("train")]
    random.Random(0).shuffle(sents)
    return sents


def _is_factworld(name: str) -> bool:
    return str(name) == "factworld"


def _corpus(args: argparse.Namespace, what: str) -> tuple[Any, str]:
    """(corpus, its name) for second-moment statistics."""
    corpus = getattr(args, "corpus", None)
    if corpus in (None, "factworld"):
        if corpus is None and not _is_factworld(args.model):
            raise InvalidArgumentError(
                f"{what} on {args.model} needs --corpus (a text file, or 'wiki') for ROME's key statistics."
            )
        from kvmem.factworld import shipped_world

        return factworld_sentences(shipped_world()), "factworld training sentences"
    if corpus != "wiki" and not Path(corpus).is_file():
        raise InvalidArgumentError(f"No such corpus file: {corpus}. Pass --corpus PATH to a text file, or 'wiki'.")
    return corpus, str(corpus)


def _n_tokens(args: argparse.Namespace, model) -> int:
    # ROME needs C invertible: far more tokens than keys.
    return args.n_tokens or max(20_000, 40 * int(model.cfg.d_mlp))


def _rome_hparams(model, layer: int | None, model_name: str, facts: list | None = None, quiet: bool = True):
    """ROME's settings for this model: its preset; else, when `facts` are given and no `layer`,
    the MLP tracing peak at the last subject token over a few of them (ROME's rule)."""
    from kvmem.editing.rome import RomeHparams, rome_hparams

    hp = rome_hparams(model)
    if _is_factworld(model_name):
        # The preset's layer (MLP 0, where the subject funnel looks facts up); fewer contexts keep a
        # CLI edit to seconds (measured with `kvmem edit` on 10 facts: S 99 at layer 0, 77 at layer 1).
        hp = replace(hp, prefixes=((5, 5), (10, 5)))
    elif hp.layer is None and layer is None and facts:
        from kvmem.editing import choose_edit_layer

        peak = choose_edit_layer(model, facts[:8], samples=3, progress=not quiet)
        hp = RomeHparams(layer=peak, prefixes=((5, 5), (10, 5)),
                         layer_source=f"kvmem CLI: MLP tracing peak at the last subject token over {len(facts[:8])} facts")
    elif hp.layer is None:  # no preset: ~30% depth (ROME's relative depth), few prefixes for CPU speed
        hp = RomeHparams(layer=max(0, round(0.3 * (model.cfg.n_layers - 1))), prefixes=((5, 5), (10, 5)),
                         layer_source="kvmem CLI: ~30% depth")
    if layer is not None:
        from kvmem.core.weights import check_layer

        hp = replace(hp, layer=check_layer(model, layer), layer_source="--layer")
    return hp


def _stats(args: argparse.Namespace, model, layer: int, what: str):
    from kvmem.editing import second_moment

    corpus, _ = _corpus(args, what)
    return second_moment(model, layer, corpus, n_tokens=_n_tokens(args, model), cache_dir=args.cache_dir,
                         progress=not args.quiet)


# --------------------------------------------------------------------------------------------
# kvmem models / recall


def cmd_models(args: argparse.Namespace) -> int:
    from kvmem.models import BUILTIN_MODELS

    for name, what in BUILTIN_MODELS.items():
        print(f"{name:14s} {what}")
    print("or a local Hugging Face folder, or an official TransformerLens name (needs the hub)")
    return 0


def cmd_recall(args: argparse.Namespace) -> int:
    import kvmem
    from kvmem.data import builtin_facts, load_known_facts
    from kvmem.recall import fact_recall

    if args.csv:
        _check_out(Path(args.csv).parent)
    model = kvmem.load_model(args.model)
    facts = load_known_facts(args.facts, limit=args.limit) if args.facts else builtin_facts()
    res = fact_recall(model, facts, batch_size=args.batch_size, progress=not args.quiet)
    print(f"{len(facts)} facts: top-1 {res.top_k(1):.1%}, top-5 {res.top_k(5):.1%}")
    if args.csv:
        _write(Path(args.csv), res.to_frame().to_csv(index=False))
    return 0


# --------------------------------------------------------------------------------------------
# kvmem facts


def cmd_facts(args: argparse.Namespace) -> int:
    from kvmem.factworld import shipped_world

    out = Path(args.out)
    _check_out(out.parent)
    world = shipped_world()
    facts = world.facts("train")
    start = args.start
    if start >= len(facts):
        raise InvalidArgumentError(f"--start {start} is past the world's {len(facts)} facts.")
    chosen = facts[start :: args.stride][: args.n]
    records = []
    for i, wf in enumerate(chosen):
        item = factworld_item(world, wf, start + i * args.stride)
        f = item.fact
        records.append({
            "case_id": item.case_id,
            "requested_rewrite": {
                "prompt": f.prompt.replace(f.subject, "{}", 1), "subject": f.subject,
                "target_true": {"str": f.target_true}, "target_new": {"str": f.target_new},
                "relation_id": f.relation_id,
            },
            "paraphrase_prompts": list(item.paraphrases),
            "neighborhood_prompts": list(item.neighbors),
            "attribute_prompts": [],
            "generation_prompts": [],
        })
    _write_json(out, records)
    _say(args, f"wrote {len(records)} factworld facts (CounterFact format) to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# kvmem trace


def _single_fact(args: argparse.Namespace, model_name: str):
    from kvmem.core.facts import Fact

    if args.prompt:
        if not args.subject:
            raise InvalidArgumentError("--prompt needs --subject (the subject as written in the prompt).")
        return Fact(args.prompt, args.subject, target_true=args.target, target_new=getattr(args, "new", None))
    if args.subject or args.target:
        raise InvalidArgumentError("--subject / --target go with --prompt; pass all of them, or none.")
    if _is_factworld(model_name):
        from kvmem.factworld import shipped_world

        world = shipped_world()
        facts = world.facts("train")
        if not 0 <= args.fact_index < len(facts):
            raise InvalidArgumentError(f"--fact-index must be in [0, {len(facts) - 1}], got {args.fact_index}.")
        item = factworld_item(world, facts[args.fact_index], args.fact_index)
        return item.fact if getattr(args, "new", None) is None else replace(item.fact, target_new=args.new)
    from kvmem.data import builtin_facts

    facts = builtin_facts()
    if not 0 <= args.fact_index < len(facts):
        raise InvalidArgumentError(f"--fact-index must be in [0, {len(facts) - 1}], got {args.fact_index}.")
    fact = facts[args.fact_index]
    new = getattr(args, "new", None)
    if new is None:  # another built-in fact's object of the same relation
        new = next((f.target_true for f in facts if f.relation_id == fact.relation_id
                    and f.target_true != fact.target_true), None)
    return replace(fact, target_new=new)


def _window(args: argparse.Namespace, model) -> int:
    window = args.window or max(1, min(10, model.cfg.n_layers // 2))
    if window > model.cfg.n_layers:
        raise InvalidArgumentError(f"--window {window} exceeds the model's {model.cfg.n_layers} layers.")
    return window


def cmd_trace(args: argparse.Namespace) -> int:
    if args.facts:
        return _trace_dataset(args)
    if args.on_error != "stop" or args.limit is not None or args.restart:
        raise InvalidArgumentError("--limit, --on-error and --restart go with --facts FILE (dataset mode).")
    _agg()
    from kvmem.tracing import trace_all

    out = _check_out(args.out)
    t0 = time.perf_counter()
    model = _load_model(args.model, args.quiet)
    fact = _single_fact(args, args.model)
    traces = trace_all(model, fact, window=_window(args, model), kinds=args.kinds, samples=args.samples,
                       seed=args.seed, progress=not args.quiet)
    _write_figure(out / "trace.png", traces.plot(title=f"{fact.prompt!r} -> {traces.traces[0].answer!r}"))
    _write(out / "trace.html", f"<!DOCTYPE html>\n<html><body>\n{traces.show().html}\n</body></html>\n")
    _write(out / "trace.csv", traces.to_frame().to_csv(index=False))
    summary = {"model": args.model, "prompt": fact.prompt, "subject": fact.subject, "answer": traces.traces[0].answer,
               "p_clean": traces.p_clean, "p_corrupt": traces.p_corrupt, "seconds": round(time.perf_counter() - t0, 2)}
    for t in traces:
        ie = t.indirect_effect.nan_to_num(nan=float("-inf"))
        layer, pos = divmod(int(ie.argmax()), ie.shape[1])
        summary[f"{t.kind}_peak"] = {"layer": layer, "token": t.str_tokens[pos], "pos": pos, "indirect_effect": float(ie.max())}
    _write_json(out / "summary.json", summary)
    _say(args, json.dumps(summary, indent=1))
    _say(args, f"wrote {out}/trace.png, trace.html, trace.csv, summary.json")
    return 0


def _aie_json(result) -> dict:
    return {
        "kinds": list(result.kinds), "buckets": list(result.buckets), "window": result.window,
        "samples": result.samples, "noise": result.noise, "n_facts": result.n_facts, "n_skipped": result.n_skipped,
        "p_clean": result.p_clean, "p_corrupt": result.p_corrupt, "counts": result.counts.tolist(),
        "aie": {k: {b: result.aie[i, j].tolist() for j, b in enumerate(result.buckets)}
                for i, k in enumerate(result.kinds)},
    }


def _trace_dataset(args: argparse.Namespace) -> int:
    _agg()
    from kvmem.tracing import average_indirect_effect, noise_level

    out = _check_out(args.out)
    items, skipped = read_facts(args)
    model = _load_model(args.model, args.quiet)
    items = check_against_model(args, model, items, skipped)
    facts = [it.fact for it in items]
    log = out / "trace_log.jsonl"
    # The noise depends on the whole fact set; ROME's 3 x std over the data set.
    noise = noise_level(model, facts)
    t0 = time.perf_counter()
    result = average_indirect_effect(
        model, facts, kinds=args.kinds, window=_window(args, model), noise=noise, samples=args.samples,
        seed=args.seed, progress=not args.quiet, log=str(log), restart=args.restart,
    )
    from kvmem.runs import RunLog

    records = RunLog(log, _log_settings(log)).records()
    per_fact = []
    for it in items:
        rec = records[it.key]
        row = {"record": it.index, "case_id": it.case_id, "prompt": rec["prompt"], "subject": rec["subject"],
               "target": rec["target"], "answer": rec["answer"], "correct": rec["correct"], "p_clean": rec["p_clean"],
               "p_corrupt": rec.get("p_corrupt")}
        if rec.get("bucket_ie"):
            for kind, buckets in rec["bucket_ie"].items():
                last_subject = buckets[2]
                if last_subject is not None:
                    row[f"{kind}_peak_layer_last_subject"] = max(range(len(last_subject)), key=last_subject.__getitem__)
        per_fact.append(row)
    import pandas as pd

    files = _write_table(out, "aie", result.to_frame())
    files += _write_table(out, "facts", pd.DataFrame(per_fact))
    _write_json(out / "aie.json", _aie_json(result))
    _write_json(out / "facts.json", [_strip_timing(records[it.key]) | {"record": it.index} for it in items])
    _write_figure(out / "aie.png", result.plot(title=f"{args.model}: {result.n_facts} facts "
                                                     f"({result.n_skipped} answered wrongly, skipped)"))
    summary = {"command": "trace", "model": args.model, "facts_file": str(args.facts), "n_records": len(items),
               "n_traced": result.n_facts, "n_wrong": result.n_skipped, "skipped_records": skipped,
               "p_clean": result.p_clean, "p_corrupt": result.p_corrupt}
    _write_json(out / "summary.json", summary)
    _say(args, f"{result.n_facts} facts traced, {result.n_skipped} answered wrongly (not averaged), "
               f"{len(skipped)} records skipped; {time.perf_counter() - t0:.1f} s")
    if result.n_facts:
        i = result.kinds.index("mlp") if "mlp" in result.kinds else 0
        curve = result.aie[i, 2]
        _say(args, f"{result.kinds[i]} AIE at the last subject token peaks at layer {int(curve.argmax())} "
                   f"({float(curve.max()):.3f})")
    _say(args, f"wrote {out}/: aie.json, aie.png, facts.json, {', '.join(files)}, summary.json "
               f"(log: {log.name})")
    return 0


def _log_settings(path: Path) -> dict:
    """The settings line of an existing run log (to reopen it read-only)."""
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())["settings"]


# --------------------------------------------------------------------------------------------
# kvmem neurons


def _neuron_record(model, item: FactItem, args: argparse.Namespace) -> dict:
    from kvmem.neurons import knowledge_neurons, neuron_effect

    prompts = list(dict.fromkeys([item.fact.prompt, *item.paraphrases]))
    t0 = time.perf_counter()
    kn = knowledge_neurons(model, prompts, item.fact.target_true, threshold=args.threshold, share=args.share,
                           layers=args.layers, steps=args.steps, progress=False)
    rec: dict = {
        "prompt": item.fact.prompt, "subject": item.fact.subject, "target": item.fact.target_true,
        "n_prompts": len(prompts), "share": kn.share, "neurons": [list(n) for n in kn.neurons],
        "n_neurons": len(kn), "prob": [a.prob for a in kn.attributions],
    }
    for name, factor in (("suppress", 0.0), ("amplify", 2.0)):
        if not kn.neurons:
            rec[name] = None
            continue
        eff = neuron_effect(model, prompts, item.fact.target_true, kn, factor=factor, n_controls=args.controls,
                            seed=args.seed)
        rec[name] = {"relative_change": eff.relative_change, "control_relative_change": eff.control_relative_change,
                     "p_before": eff.p_before.mean().item(), "p_after": eff.p_after.mean().item()}
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _neurons_figure(rows: list[dict], n_layers: int):
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    counts = np.zeros(n_layers)
    for r in rows:
        for layer, _ in r["neurons"]:
            counts[layer] += 1
    a.bar(range(n_layers), counts)
    a.set_xlabel("layer")
    a.set_ylabel("knowledge neurons (all facts)")
    a.set_title(f"{len(rows)} facts")
    labels, vals, ctrl = [], [], []
    for name in ("suppress", "amplify"):
        got = [r[name] for r in rows if r.get(name)]
        if got:
            labels.append(name)
            vals.append(100 * float(np.mean([g["relative_change"] for g in got])))
            ctrl.append(100 * float(np.nanmean([g["control_relative_change"] for g in got])))
    x = np.arange(len(labels))
    b.bar(x - 0.2, vals, 0.4, label="knowledge neurons", color="C3")
    b.bar(x + 0.2, ctrl, 0.4, label="random neurons", color="C7")
    b.set_xticks(x, labels)
    b.axhline(0, color="k", lw=0.8)
    b.set_ylabel("mean relative change of p(target), %")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cmd_neurons(args: argparse.Namespace) -> int:
    _agg()
    out = _check_out(args.out)
    items, skipped = read_facts(args)
    model = _load_model(args.model, args.quiet)
    items = check_against_model(args, model, items, skipped)
    settings = {"analysis": "knowledge_neurons", "model": _fingerprint(model), "threshold": args.threshold,
                "share": args.share, "steps": args.steps, "layers": args.layers, "controls": args.controls,
                "seed": args.seed}
    run_and_log(args, model, items, skipped, out, "neurons", settings, _neuron_record)
    log = _open_log(args, out, "neurons", settings).records()
    rows = [_strip_timing(log[it.key]) | {"record": it.index, "case_id": it.case_id} for it in items if it.key in log]
    import pandas as pd

    table = pd.DataFrame([{
        "record": r["record"], "case_id": r["case_id"], "prompt": r["prompt"], "target": r["target"],
        "n_prompts": r["n_prompts"], "n_neurons": r["n_neurons"], "share": r["share"],
        "suppress": (r["suppress"] or {}).get("relative_change"),
        "suppress_control": (r["suppress"] or {}).get("control_relative_change"),
        "amplify": (r["amplify"] or {}).get("relative_change"),
        "amplify_control": (r["amplify"] or {}).get("control_relative_change"),
    } for r in rows])
    neurons = pd.DataFrame([{"record": r["record"], "layer": l, "neuron": n} for r in rows for l, n in r["neurons"]],
                           columns=["record", "layer", "neuron"])
    files = _write_table(out, "neurons", table) + _write_table(out, "neuron_list", neurons)
    _write_json(out / "neurons.json", rows)
    _write_figure(out / "neurons.png", _neurons_figure(rows, model.cfg.n_layers))
    summary = {"command": "neurons", "model": args.model, "facts_file": str(args.facts), "n_facts": len(rows),
               "skipped_records": skipped, "failed": _failed(log, items),
               "mean_neurons": float(table["n_neurons"].mean()) if len(table) else None}
    _write_json(out / "summary.json", summary)
    _say(args, f"{len(rows)} facts: {summary['mean_neurons']:.1f} knowledge neurons on average; "
               f"suppressing them changes p(target) by {table['suppress'].mean():+.0%} "
               f"(random: {table['suppress_control'].mean():+.0%})")
    _say(args, f"wrote {out}/: neurons.json, neurons.png, {', '.join(files)}, summary.json")
    return 0


def _failed(log: dict, items: list[FactItem]) -> list[dict]:
    return [{"record": it.index, "error": log[it.key]["error"]} for it in items
            if it.key in log and log[it.key].get("error")]


def run_and_log(
    args: argparse.Namespace,
    model,
    items: list[FactItem],
    skipped: list[dict],
    out: Path,
    name: str,
    settings: dict,
    compute: Callable[[Any, FactItem, argparse.Namespace], dict],
) -> None:
    """Compute each fact not yet in `<out>/<name>_log.jsonl` and log it as soon as it is done.

    A fact whose computation kvmem rejects is logged with its error under `--on-error skip`
    (rerunning does not retry it: the same inputs give the same error) or stops the run.
    """
    log = _open_log(args, out, name, settings)
    todo = [it for it in items if it.key not in log]
    if len(items) - len(todo):
        _say(args, f"resuming: {len(items) - len(todo)} of {len(items)} facts already in {log.path}")
    bar = _progress(args, len(items), len(items) - len(todo), name)
    try:
        for item in todo:
            try:
                rec = compute(model, item, args)
            except KvmemError as e:
                if args.on_error == "stop":
                    raise type(e)(f"{args.facts} record {item.index}: {e} (pass --on-error skip to go on)") from None
                _warn(f"record {item.index} failed: {e}")
                rec = {"prompt": item.fact.prompt, "subject": item.fact.subject, "error": f"{type(e).__name__}: {e}"}
            log.add(item.key, rec)
            bar.update()
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# kvmem edit


class _Editor:
    """ROME with statistics and context prefixes computed once for the whole run."""

    def __init__(self, model, hparams, stats, generation: bool):
        from kvmem.editing.rome import context_prefixes

        self.hparams, self.stats, self.generation = hparams, stats, generation
        self.prefixes = context_prefixes(model, hparams)

    def __call__(self, model, item: FactItem, args: argparse.Namespace) -> dict:
        from kvmem.editing import compute_rome_edit, edited
        from kvmem.evaluation import record_metrics

        rec_cf = item.counterfact()
        kw = dict(generation=self.generation, gen_prompts=2, gen_tokens=40, seed=args.seed)
        t0 = time.perf_counter()
        before = record_metrics(model, rec_cf, **kw)
        edit = compute_rome_edit(model, item.fact, stats=self.stats, hparams=self.hparams, prefixes=self.prefixes)
        with edited(model, edit, check=False):  # computed on this very model just now
            after = record_metrics(model, rec_cf, **kw)
        return {
            "prompt": item.fact.prompt, "subject": item.fact.subject, "target_true": item.fact.target_true,
            "target_new": item.fact.target_new, "layer": edit.layer, "v_steps": int(edit.loss_trace.shape[0]),
            "final_p_target": float(edit.loss_trace[-1, 4]) if edit.loss_trace.numel() else None,
            "n_paraphrases": len(item.paraphrases), "n_neighbors": len(item.neighbors),
            "unedited": before, "edited": after, "seconds": round(time.perf_counter() - t0, 3),
        }


def _edit_summary(rows: list[dict]):
    """ROME's table (means ×100, S = hmean(ES, PS, NS)) via `CounterFactEval.summary`."""
    import pandas as pd

    from kvmem.evaluation import METRICS, CounterFactEval

    frame = pd.DataFrame([{"condition": cond, "case_id": r["case_id"], **r[key], "error": None}
                          for key, cond in (("unedited", "unedited"), ("edited", "ROME")) for r in rows])
    return CounterFactEval(frame).summary()[list(METRICS)]


def _edit_figure(summary):
    import matplotlib.pyplot as plt
    import numpy as np

    cols = ["S", "ES", "PS", "NS"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(cols))
    for k, (cond, row) in enumerate(summary.iterrows()):
        ax.bar(x + (k - 0.5) * 0.4, [row[c] for c in cols], 0.4, label=cond)
    ax.set_xticks(x, cols)
    ax.set_ylim(0, 105)
    ax.set_ylabel("CounterFact metric (×100)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cmd_edit(args: argparse.Namespace) -> int:
    _agg()
    out = _check_out(args.out)
    items, skipped = read_facts(args, need_new=True)
    _corpus(args, "kvmem edit")  # a missing --corpus fails before the model loads
    model = _load_model(args.model, args.quiet)
    items = check_against_model(args, model, items, skipped, need_new=True)
    hp = _rome_hparams(model, args.layer, args.model, [it.fact for it in items], args.quiet)
    stats = _stats(args, model, hp.layer, "kvmem edit")
    settings = {"analysis": "rome_edit", "model": _fingerprint(model), "layer": hp.layer,
                "prefixes": [list(p) for p in hp.prefixes], "stats": stats.corpus_fingerprint,
                "n_tokens": stats.n_tokens, "generation": args.generation, "seed": args.seed}
    run_and_log(args, model, items, skipped, out, "edit", settings, _Editor(model, hp, stats, args.generation))
    log = _open_log(args, out, "edit", settings).records()
    rows = [_strip_timing(log[it.key]) | {"record": it.index, "case_id": it.case_id} for it in items
            if it.key in log and not log[it.key].get("error")]
    import pandas as pd

    flat = pd.DataFrame([{
        "record": r["record"], "case_id": r["case_id"], "subject": r["subject"], "target_true": r["target_true"],
        "target_new": r["target_new"], "layer": r["layer"],
        **{f"{m}_before": r["unedited"].get(m) for m in ("ES", "PS", "NS")},
        **{m: r["edited"].get(m) for m in ("ES", "EM", "PS", "PM", "NS", "NM", "GE")},
    } for r in rows])
    files = _write_table(out, "edits", flat)
    _write_json(out / "edits.json", rows)
    summary_table = _edit_summary(rows) if rows else None
    summary = {"command": "edit", "model": args.model, "facts_file": str(args.facts), "layer": hp.layer,
               "n_edits": len(rows), "skipped_records": skipped, "failed": _failed(log, items),
               "table": summary_table.to_dict(orient="index") if summary_table is not None else None}
    _write_json(out / "summary.json", summary)
    if summary_table is not None:
        _write_figure(out / "edits.png", _edit_figure(summary_table))
        from kvmem.evaluation import _markdown

        _say(args, _markdown(summary_table[["S", "ES", "PS", "NS", "EM", "PM", "NM"]]))
    _say(args, f"wrote {out}/: edits.json, edits.png, {', '.join(files)}, summary.json")
    return 0


# --------------------------------------------------------------------------------------------
# kvmem stats


def cmd_stats(args: argparse.Namespace) -> int:
    _agg()
    out = _check_out(args.out)
    corpus, corpus_name = _corpus(args, "kvmem stats")
    model = _load_model(args.model, args.quiet)
    from kvmem.core.weights import check_layer

    layers = [check_layer(model, l) for l in (args.layers or [_rome_hparams(model, None, args.model).layer])]
    settings = {"analysis": "second_moment", "model": _fingerprint(model), "corpus": corpus_name,
                "n_tokens": _n_tokens(args, model)}
    from kvmem.editing import second_moment
    from kvmem.runs import RunLog

    log = RunLog(out / "stats_log.jsonl", settings, restart=args.restart)
    bar = _progress(args, len(layers), sum(f"layer-{l}" in log for l in layers), "layers")
    try:
        for layer in layers:
            if f"layer-{layer}" in log:
                continue
            sm = second_moment(model, layer, corpus, n_tokens=_n_tokens(args, model), cache_dir=args.cache_dir,
                               progress=False)
            log.add(f"layer-{layer}", {
                "layer": layer, "n_tokens": sm.n_tokens, "condition_number": sm.condition_number,
                "eigmin": sm.eigmin, "eigmax": sm.eigmax, "corpus_fingerprint": sm.corpus_fingerprint,
                "cache_file": sm.path, "tokens_seen": sm.tokens_seen.tolist(), "rel_change": sm.rel_change.tolist(),
                "seconds": round(sm.seconds, 3),
            })
            bar.update()
    finally:
        bar.close()
    recs = log.records()
    rows = [_strip_timing(recs[f"layer-{l}"]) for l in layers]
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for r in rows:
        if r["rel_change"]:
            ax.loglog(r["tokens_seen"], r["rel_change"], "o-", label=f"layer {r['layer']}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("relative change of C")
    ax.set_title(f"Convergence of C over {corpus_name}"[:80], fontsize=9)
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _write_figure(out / "stats.png", fig)
    files = _write_table(out, "stats", pd.DataFrame([{k: v for k, v in r.items()
                                                      if k not in ("tokens_seen", "rel_change")} for r in rows]))
    _write_json(out / "stats.json", {"model": args.model, "corpus": corpus_name, "layers": rows})
    for r in rows:
        _say(args, f"layer {r['layer']}: C from {r['n_tokens']} tokens, condition number {r['condition_number']:.3g}"
                   f", cached at {r['cache_file']}")
    _say(args, f"wrote {out}/: stats.json, stats.png, {', '.join(files)}")
    return 0


# --------------------------------------------------------------------------------------------
# kvmem demo


def run_demo(
    model, item: FactItem, stats, hparams, args: argparse.Namespace, kn_prompts: list[str] | None = None
) -> dict:
    """The four analyses of one fact. Returns the result objects by name (for the report).

    `kn_prompts`: the prompts knowledge neurons are shared across (default: the fact's prompt and
    its paraphrases)."""
    import torch

    from kvmem.editing import compute_rome_edit, edited
    from kvmem.evaluation import evaluate_counterfact
    from kvmem.memories import fact_memories
    from kvmem.neurons import knowledge_neurons, neuron_effect
    from kvmem.core.tokenize import encode
    from kvmem.tracing import trace_all

    fact = item.fact
    timings = {}
    t = time.perf_counter()
    traces = trace_all(model, fact, window=_window(args, model), samples=args.samples, seed=args.seed)
    timings["causal tracing"] = time.perf_counter() - t

    t = time.perf_counter()
    prompts = list(dict.fromkeys(kn_prompts or [fact.prompt, *item.paraphrases]))
    kn = knowledge_neurons(model, prompts, fact.target_true, steps=args.steps, progress=False)
    effects = [neuron_effect(model, prompts, fact.target_true, kn, factor=f, seed=args.seed)
               for f in (0.0, 2.0)] if kn.neurons else []
    timings["knowledge neurons"] = time.perf_counter() - t

    t = time.perf_counter()
    memories = fact_memories(model, fact)
    timings["memories"] = time.perf_counter() - t

    t = time.perf_counter()
    edit = compute_rome_edit(model, fact, stats=stats, hparams=hparams)
    record = item.counterfact()
    evaluation = evaluate_counterfact(model, [record], editor=lambda m, r: edit, generation=False, progress=False)
    answers = []
    checks = [("rewrite", fact.prompt, fact.target_true)]
    checks += [("paraphrase", p, fact.target_true) for p in item.paraphrases[:3]]
    checks += [("neighbour", p, None) for p in item.neighbors[:3]]

    def top1(prompt: str) -> str:
        with torch.no_grad():
            logits = model(torch.tensor([encode(model, prompt)], device=model.cfg.device))[0, -1]
        return model.tokenizer.decode([int(logits.argmax())])

    before = [top1(p) for _, p, _ in checks]
    with edited(model, edit, check=False):
        after = [top1(p) for _, p, _ in checks]
    for (kind, prompt, _), b, a in zip(checks, before, after):
        answers.append({"prompt": prompt, "kind": kind, "before": b, "after": a})
    timings["ROME edit + evaluation"] = time.perf_counter() - t
    return {"traces": traces, "neurons": kn, "effects": effects, "memories": memories, "edit": edit,
            "evaluation": evaluation, "answers": answers, "timings": timings}


def cmd_demo(args: argparse.Namespace) -> int:
    _agg()
    from kvmem.viz.report import fact_report

    t0 = time.perf_counter()
    out = _check_out(args.out)
    _, corpus_name = _corpus(args, "kvmem demo")  # a missing --corpus fails before the model loads
    kn_prompts = None
    if _is_factworld(args.model) and not args.prompt:
        from kvmem.factworld import shipped_world

        world = shipped_world()
        facts = world.facts("train")
        if not 0 <= args.fact_index < len(facts):
            raise InvalidArgumentError(f"--fact-index must be in [0, {len(facts) - 1}], got {args.fact_index}.")
        item = factworld_item(world, facts[args.fact_index], args.fact_index)
        # Dai et al. share neurons across a fact's paraphrases: every template the world has.
        kn_prompts = [p.prompt for split in ("train", "paraphrase")
                      for p in world.prompts_for(facts[args.fact_index], split)]
        if args.new:
            item = replace(item, fact=replace(item.fact, target_new=args.new))
    else:
        fact = _single_fact(args, args.model)
        if fact.target_true is None:
            raise InvalidArgumentError("The demo needs the true answer: pass --target.")
        if fact.target_new is None:
            raise InvalidArgumentError("The demo's ROME edit needs a new object: pass --new.")
        item = FactItem(0, fact, tuple(args.paraphrase or ()), tuple(args.neighbor or ()))
    model = _load_model(args.model, args.quiet)
    t_load = time.perf_counter() - t0
    hp = _rome_hparams(model, args.layer, args.model, [item.fact], args.quiet)
    t = time.perf_counter()
    stats = _stats(args, model, hp.layer, "kvmem demo")
    t_stats = time.perf_counter() - t
    res = run_demo(model, item, stats, hp, args, kn_prompts)
    timings = {"load model": t_load, "ROME statistics": t_stats, **res["timings"]}

    traces, kn, edit, ev = res["traces"], res["neurons"], res["edit"], res["evaluation"]
    summ = ev.summary()
    edited_row = summ.loc["ROME"]
    mlp = traces["mlp"] if "mlp" in traces.kinds else traces.traces[0]
    ie = mlp.indirect_effect
    layer, pos = divmod(int(ie.argmax()), int(ie.shape[1]))
    top_mem = res["memories"].top_memories(1, "subject_last")[0]
    summary = {
        "model": args.model, "prompt": item.fact.prompt, "subject": item.fact.subject,
        "target_true": item.fact.target_true, "target_new": item.fact.target_new,
        "answer": traces.traces[0].answer, "p_clean": traces.p_clean, "p_corrupt": traces.p_corrupt,
        "mlp_peak": {"layer": layer, "token": mlp.str_tokens[pos], "indirect_effect": float(ie.max())},
        "knowledge_neurons": [list(n) for n in kn.neurons],
        "suppress_relative_change": res["effects"][0].relative_change if res["effects"] else None,
        "amplify_relative_change": res["effects"][1].relative_change if res["effects"] else None,
        "top_memory_subject_last": {"layer": top_mem[0], "neuron": top_mem[1], "push": top_mem[2]},
        "edit_layer": edit.layer,
        "counterfact": {m: float(edited_row[m]) for m in ("S", "ES", "PS", "NS")},
        "answers": res["answers"],
    }
    meta = {"model": args.model, "edit layer": edit.layer, "noise samples": args.samples,
            "ROME statistics": f"{stats.n_tokens} tokens of {corpus_name}"}
    rep = fact_report(f"kvmem: one fact, four views ({args.model})", item.fact, traces=traces, neurons=kn,
                      effects=res["effects"], memories=res["memories"], edit=edit, evaluation=ev,
                      answers=res["answers"], meta=meta)
    rep.table([{"step": k, "seconds": round(v, 2)} for k, v in timings.items()], caption="Time")
    rep.save(out / "report.html")
    summary["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    _write_json(out / "summary.json", summary)

    eff = res["effects"]
    lines = [
        f"fact: {item.fact.prompt!r} -> {item.fact.target_true!r} (model: {args.model})",
        f"1. causal tracing: p(answer) {traces.p_clean:.2f} clean, {traces.p_corrupt:.2f} with the subject noised; "
        f"MLP restoration peaks at layer {layer}, token {mlp.str_tokens[pos]!r} (+{float(ie.max()):.2f})",
        f"2. knowledge neurons: {len(kn)} over {len(kn.prompts)} prompts"
        + (f"; suppressing them {eff[0].relative_change:+.0%} (random {eff[0].control_relative_change:+.0%}), "
           f"amplifying {eff[1].relative_change:+.0%}" if eff else ""),
        f"3. memories: strongest push at the subject's last token: L{top_mem[0]}.N{top_mem[1]} ({top_mem[2]:+.2f})",
        f"4. ROME at layer {edit.layer}: {item.fact.target_true!r} -> {item.fact.target_new!r}: "
        f"ES {edited_row['ES']:.0f}, PS {edited_row['PS']:.0f}, NS {edited_row['NS']:.0f}, S {edited_row['S']:.0f}",
        f"wrote {out / 'report.html'} (opens offline) and {out / 'summary.json'} in {summary['seconds']['total']:.1f} s",
    ]
    for line in lines:
        _say(args, line)
    return 0


# --------------------------------------------------------------------------------------------
# The parser


def _batch_options(p: argparse.ArgumentParser, out_default: str, facts_required: bool = True) -> None:
    p.add_argument("--model", default="factworld", help="factworld (default), gemma-3-270m, smollm2-135m or a folder")
    p.add_argument("--facts", required=facts_required, metavar="FILE",
                   help="JSON list of facts: known_1000, CounterFact or {prompt, subject, target, ...} records")
    p.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")
    p.add_argument("--limit", type=_positive_int, help="use only the first N records")
    p.add_argument("--on-error", choices=("skip", "stop"), default="stop",
                   help="a malformed or unusable record: stop (default) or skip it and go on")
    p.add_argument("--restart", action="store_true", help="discard the run log in --out and start over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmem", description="MLP layers as key-value memories of facts.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="one fact, four analyses, one offline HTML report")
    d.add_argument("--model", default="factworld")
    d.add_argument("--fact-index", type=_nonneg_int, default=0, help="which built-in fact when no --prompt")
    d.add_argument("--prompt")
    d.add_argument("--subject")
    d.add_argument("--target", help="the true answer")
    d.add_argument("--new", help="the object the ROME edit writes (default for factworld: another object)")
    d.add_argument("--paraphrase", action="append", help="another prompt of the same fact (repeatable)")
    d.add_argument("--neighbor", action="append", help="a prompt whose answer the edit must keep (repeatable)")
    d.add_argument("--corpus", help="text for ROME's key statistics (default for factworld: its training sentences)")
    d.add_argument("--n-tokens", type=_positive_int, help="tokens for the statistics (default max(20000, 40 d_mlp))")
    d.add_argument("--cache-dir", help="where statistics are cached (default $KVMEM_CACHE or ~/.cache/kvmem)")
    d.add_argument("--layer", type=_nonneg_int, help="the MLP layer to edit (default: the model's preset)")
    d.add_argument("--window", type=_positive_int, default=None)
    d.add_argument("--samples", type=_positive_int, default=10, help="noise samples for causal tracing")
    d.add_argument("--steps", type=_positive_int, default=20, help="integrated-gradients steps")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="kvmem-demo")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    sub.add_parser("models", help="list the models kvmem loads offline").set_defaults(func=cmd_models)

    t = sub.add_parser("trace", help="causal trace of one fact, or average indirect effect over --facts FILE")
    _batch_options(t, "kvmem-trace", facts_required=False)
    t.add_argument("--prompt")
    t.add_argument("--subject")
    t.add_argument("--target", help="expected answer (default: the model's own top token)")
    t.add_argument("--fact-index", type=_nonneg_int, default=0, help="which built-in fact when no --prompt")
    t.add_argument("--kinds", type=_kinds, default=["resid", "mlp", "attn"], help="comma-separated: resid,mlp,attn")
    t.add_argument("--window", type=_positive_int, default=None,
                   help="mlp/attn window (default: 10, or n_layers//2 if smaller)")
    t.add_argument("--samples", type=_positive_int, default=10)
    t.set_defaults(func=cmd_trace)

    n = sub.add_parser("neurons", help="knowledge neurons of each fact (+ suppress / amplify effects)")
    _batch_options(n, "kvmem-neurons")
    n.add_argument("--steps", type=_positive_int, default=20)
    n.add_argument("--threshold", type=_share, default=0.2, help="t: share of the maximum attribution")
    n.add_argument("--share", type=_share, default=0.7, help="p: share of a fact's prompts a neuron must pass t in")
    n.add_argument("--layers", type=_int_list, help="comma-separated layers (default: all)")
    n.add_argument("--controls", type=_nonneg_int, default=1, help="random-neuron control draws")
    n.set_defaults(func=cmd_neurons)

    e = sub.add_parser("edit", help="ROME edit of each fact and its CounterFact metrics")
    _batch_options(e, "kvmem-edit")
    e.add_argument("--layer", type=_nonneg_int)
    e.add_argument("--corpus", help="text for the key statistics (default for factworld: its training sentences)")
    e.add_argument("--n-tokens", type=_positive_int)
    e.add_argument("--cache-dir")
    e.add_argument("--generation", action="store_true", help="also measure generation entropy (GE; slower)")
    e.set_defaults(func=cmd_edit)

    s = sub.add_parser("stats", help="second-moment statistics of MLP keys (ROME's C), cached")
    s.add_argument("--model", default="factworld")
    s.add_argument("--layers", type=_int_list, help="comma-separated layers (default: the ROME edit layer)")
    s.add_argument("--corpus", help="a text file or 'wiki' (default for factworld: its training sentences)")
    s.add_argument("--n-tokens", type=_positive_int)
    s.add_argument("--cache-dir")
    s.add_argument("--out", default="kvmem-stats")
    s.add_argument("--restart", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_stats)

    f = sub.add_parser("facts", help="write fact-world facts as a CounterFact-format JSON file")
    f.add_argument("--n", type=_positive_int, default=20)
    f.add_argument("--start", type=_nonneg_int, default=0)
    f.add_argument("--stride", type=_positive_int, default=1, help="take every k-th fact (mixes subjects)")
    f.add_argument("--out", default="factworld_facts.json")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_facts)

    r = sub.add_parser("recall", help="top-1/top-5 recall of facts (known_1000.json format)")
    r.add_argument("--model", default="factworld")
    r.add_argument("--facts", help="path to known_1000.json (default: kvmem's built-in facts)")
    r.add_argument("--limit", type=_positive_int)
    r.add_argument("--batch-size", type=_positive_int, default=16)
    r.add_argument("--csv")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_recall)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: usage + message, exit 2
    try:
        return args.func(args)
    except KvmemError as e:
        _warn(e)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        _warn(f"interrupted. Finished facts are kept{f' in {out}' if out else ''}; "
              "run the same command again to resume.")
        return 130
    except OSError as e:  # a disk or permission problem outside kvmem's own checks
        _warn(f"{e.strerror or e}: {getattr(e, 'filename', '') or ''}. Check the paths and free space.")
        return 2


