"""The command line: one subparser per command, with argument types that reject bad values
before any work (usage + message, exit status 2)."""

from __future__ import annotations

import argparse

from kvmem import __version__
from kvmem.cli.demo import cmd_demo
from kvmem.cli.edit import cmd_edit
from kvmem.cli.facts import cmd_facts
from kvmem.cli.models import cmd_models
from kvmem.cli.neurons import cmd_neurons
from kvmem.cli.recall import cmd_recall
from kvmem.cli.stats import cmd_stats
from kvmem.cli.runtime import add_executor_options, add_out_option, add_runtime_options
from kvmem.cli.trace import cmd_trace
from kvmem.editing.nullspace import ALPHAEDIT_THRESHOLD

MODEL_HELP = "factworld (default), gemma-3-270m, smollm2-135m or a folder"


def _whole_number(text: str, minimum: int, bound: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "at least 1")


def nonneg_int(text: str) -> int:
    return _whole_number(text, 0, "0 or more")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 1,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one layer")
    return values


def kinds(text: str) -> list[str]:
    values = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in values if k not in ("resid", "mlp", "attn")]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"kinds are resid, mlp, attn (comma-separated), got {text!r}")
    return values


SEED_HELP = "random seed (noise samples, controls) (default: 0)"
QUIET_HELP = "no progress bars or summary"
RESTART_HELP = "discard the run log in --out and start over"
STRICT_HELP = ("stop with an error, not a warning, when only the first token of a several-token target is "
               "traced or the model does not predict the target (kvmem.config.predicts)")


def _model_options(p: argparse.ArgumentParser, command: str) -> None:
    """--model, --out (default per model and command), --threads, --device."""
    p.add_argument("--model", default="factworld", help=MODEL_HELP)
    add_out_option(p, command)
    add_runtime_options(p)


def _batch_options(p: argparse.ArgumentParser, command: str, facts_required: bool = True) -> None:
    _model_options(p, command)
    p.add_argument("--facts", required=facts_required, metavar="FILE",
                   help="JSON list of facts: known_1000, CounterFact or {prompt, subject, target, ...} records; "
                        "a path, or a name in the data folder $KVMEM_DATA (e.g. known_1000.json)")
    p.add_argument("--limit", type=positive_int, help="use only the first N records")
    p.add_argument("--on-error", choices=("skip", "stop"), default="stop",
                   help="a malformed or unusable record: stop (default) or skip it and go on")
    p.add_argument("--restart", action="store_true", help=RESTART_HELP)
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    add_executor_options(p)


def _statistics_options(p: argparse.ArgumentParser, corpus_help: str) -> None:
    p.add_argument("--corpus", help=f"{corpus_help}; a path, a name in the data folder $KVMEM_DATA "
                                    "(e.g. corpus/wiki_vital_en.txt), 'wiki' or 'samples' (text sampled from the "
                                    "model). Default on a real model: the Wikipedia summaries when installed or in "
                                    "the data folder, else 'samples'")
    p.add_argument("--n-tokens", type=positive_int, help="tokens for the statistics (default max(20000, 40 d_mlp))")
    p.add_argument("--cache-dir", help="where statistics are cached (default $KVMEM_CACHE or ~/.cache/kvmem)")


def _fact_options(p: argparse.ArgumentParser, target_help: str) -> None:
    p.add_argument("--prompt", help="the fact's prompt, ending where the answer starts (needs --subject)")
    p.add_argument("--subject", help="the subject as written in --prompt")
    p.add_argument("--target", help=target_help)
    p.add_argument("--fact-index", type=nonneg_int, default=0, help="which built-in fact when no --prompt")


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="one fact, four analyses, one offline HTML report")
    _model_options(d, "demo")
    _fact_options(d, "the true answer")
    d.add_argument("--new", help="the object the ROME edit writes (default for factworld: another object)")
    d.add_argument("--paraphrase", action="append", help="another prompt of the same fact (repeatable)")
    d.add_argument("--neighbour", "--neighbor", dest="neighbour", action="append",
                   help="a prompt whose answer the edit must keep (repeatable)")
    _statistics_options(d, "text for ROME's key statistics (default for factworld: its training sentences)")
    d.add_argument("--layer", type=nonneg_int, help="the MLP layer to edit (default: the model's preset)")
    d.add_argument("--window", type=positive_int, default=None,
                   help="MLP/attention tracing window (default: kvmem.config.trace_window)")
    d.add_argument("--samples", type=positive_int, default=10, help="noise samples for causal tracing")
    d.add_argument("--steps", type=positive_int, default=20, help="integrated-gradients steps")
    d.add_argument("--strict", action="store_true", help=STRICT_HELP)
    d.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    d.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    d.set_defaults(func=cmd_demo)


def _add_batch_commands(sub) -> None:
    t = sub.add_parser("trace", help="causal trace of one fact, or average indirect effect over --facts FILE")
    _batch_options(t, "trace", facts_required=False)
    _fact_options(t, "expected answer (default: the model's own top token)")
    t.add_argument("--kinds", type=kinds, default=["resid", "mlp", "attn"], help="comma-separated: resid,mlp,attn")
    t.add_argument("--window", type=positive_int, default=None,
                   help="mlp/attn window (default: kvmem.config.trace_window: 10, or n_layers//2 if smaller)")
    t.add_argument("--samples", type=positive_int, default=10, help="noise samples per fact (default: 10, as ROME)")
    t.add_argument("--method", choices=["exact", "atp", "atp*", "ig", "eap-ig"], default="exact",
                   help="exact causal tracing (default), or the grid estimated from gradients "
                        "(kvmem.tracing.attribution; docs/attribution.md)")
    t.add_argument("--steps", type=positive_int, default=None, help="path steps of --method ig / eap-ig")
    t.add_argument("--strict", action="store_true", help=STRICT_HELP)
    t.set_defaults(func=cmd_trace)

    n = sub.add_parser("neurons", help="knowledge neurons of each fact (+ suppress / amplify effects)")
    _batch_options(n, "neurons")
    n.add_argument("--steps", type=positive_int, default=20, help="integrated-gradients steps (default: 20)")
    n.add_argument("--threshold", type=share, default=0.2, help="t: share of the maximum attribution")
    n.add_argument("--share", type=share, default=0.7, help="p: share of a fact's prompts a neuron must pass t in")
    n.add_argument("--layers", type=int_list, help="comma-separated layers (default: all)")
    n.add_argument("--controls", type=nonneg_int, default=1, help="random-neuron control draws")
    n.set_defaults(func=cmd_neurons)

    e = sub.add_parser("edit", help="ROME edit of each fact and its CounterFact metrics")
    _batch_options(e, "edit")
    e.add_argument("--layer", type=nonneg_int, help="the MLP layer to edit (default: the model's preset)")
    _statistics_options(e, "text for the key statistics (default for factworld: its training sentences)")
    e.add_argument("--generation", action="store_true", help="also measure generation entropy (GE; slower)")
    e.add_argument("--safe", action="store_true",
                   help="refuse edits predicted to disturb the neighbourhood (kvmem.predict_interference; "
                   "without it such edits only warn; either way each fact's predicted risk is in edits.json)")
    e.add_argument("--method", choices=("rome", "memit", "alphaedit"), default="rome",
                   help="rome: one edit per fact; memit/alphaedit: one multi-layer edit per --batch-size facts")
    e.add_argument("--batch-size", type=positive_int, default=1, help="facts per MEMIT/AlphaEdit edit (default: 1)")
    e.add_argument("--null-space", type=positive_float, nargs="?", const=ALPHAEDIT_THRESHOLD, default=None,
                   metavar="THRESHOLD",
                   help="--method rome: confine each update to the null space of C (AlphaEdit's constraint: "
                   f"eigenvalues of C below THRESHOLD, default {ALPHAEDIT_THRESHOLD:g}); --method alphaedit: its threshold")
    e.set_defaults(func=cmd_edit)


def _add_small_commands(sub) -> None:
    s = sub.add_parser("stats", help="second-moment statistics of MLP keys (ROME's C), cached")
    _model_options(s, "stats")
    s.add_argument("--layers", type=int_list, help="comma-separated layers (default: the ROME edit layer)")
    _statistics_options(s, "a text file or 'wiki' (default for factworld: its training sentences)")
    s.add_argument("--restart", action="store_true", help=RESTART_HELP)
    s.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    add_executor_options(s)
    s.set_defaults(func=cmd_stats)

    f = sub.add_parser("facts", help="write fact-world facts as a CounterFact-format JSON file")
    f.add_argument("--n", type=positive_int, default=20, help="how many facts (default: 20)")
    f.add_argument("--start", type=nonneg_int, default=0, help="index of the first fact (default: 0)")
    f.add_argument("--stride", type=positive_int, default=1, help="take every k-th fact (mixes subjects)")
    f.add_argument("--out", default="factworld_facts.json",
                   help="the JSON file to write (default: factworld_facts.json)")
    f.add_argument("--quiet", action="store_true", help="print nothing")
    f.set_defaults(func=cmd_facts)

    r = sub.add_parser("recall", help="top-1/top-5 recall of facts (known_1000.json format)")
    r.add_argument("--model", default="factworld", help=MODEL_HELP)
    add_runtime_options(r)
    r.add_argument("--facts", help="facts in known_1000.json's format: a path, or a name in the data folder "
                                   "$KVMEM_DATA, e.g. known_1000.json (default: kvmem's built-in facts)")
    r.add_argument("--limit", type=positive_int, help="use only the first N facts")
    r.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass (default: 16)")
    r.add_argument("--csv", metavar="FILE", help="also write the per-fact results to this CSV file")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_recall)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmem", description="MLP layers as key-value memories of facts.")
    p.add_argument("--version", action="version", version=f"kvmem {__version__}", help="print kvmem's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    sub.add_parser("models", help="list the models kvmem loads offline").set_defaults(func=cmd_models)
    _add_batch_commands(sub)
    _add_small_commands(sub)
    return p
