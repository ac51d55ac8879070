"""What every benchmark script shares: where things are, where the evaluation data and the peers
live, the provenance of a result file, markdown tables, bootstrap confidence intervals, the
resumable and shardable run, and process memory.

The scripts are run as `python benchmarks/<script>.py`, so this folder is on their import path and
`from common import ...` works without touching `sys.path`; kvmem itself is installed.

- Paths: `ROOT`, `RESULTS`, `results_dir(analysis)` (results live in `benchmarks/results/<analysis>/`).
- Data: the evaluation data (CounterFact, known_1000, PARAREL, the corpus) lives outside the
  repository, in the folder given by `--data`, else `$KVMEM_DATA`, else `../shared/data` next to the
  repository (`add_data_arguments`, `data_file`).
- Peers: the other implementations run in their own virtual environments, set up by
  `benchmarks/peers/setup.sh DIR`; scripts find them by `--peers DIR` or `$KVMEM_PEERS` (`peer_python`).
- Provenance: `provenance()` (command line, git commit, machine, date) and `provenance_line()`.
- Tables: `table(columns, rows)` (a DataFrame: `kvmem.evaluation.markdown_table`).
- Bootstrap: `bootstrap_ci(statistic, *samples, n, seed | rng)`, percentile CIs over resamples.
- Runs: `add_run_arguments` + `RunPlan` (resume, `--shard I/N`, `--merge N`, `--logged-only`)
  on `kvmem.runs`.
- Memory: `rss_mb()`, `peak_rss_mb()`, `reset_peak_rss()` (Linux `/proc`; NaN / False elsewhere).
- `reference()`: the plain reference implementations the tests use (`tests/reference.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from kvmem.datafiles import DATA_ENV, data_folder

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
TESTS = ROOT / "tests"


def results_dir(analysis: str) -> Path:
    """`benchmarks/results/<analysis>/`: tracing, neurons, memories, editing, diagnose, stress, models."""
    return RESULTS / analysis


# --- evaluation data ---------------------------------------------------------------------------

# The folder rule is the library's (`kvmem.datafiles.data_folder`: $KVMEM_DATA); the project's own
# runs fall back on the shared folder beside the repository, which users do not have.
SHARED_DATA = ROOT.parent / "shared" / "data"

# The files the scripts read, relative to the data folder (its layout: ../shared/data/README.md).
DATA_FILES = {
    "counterfact": "counterfact/counterfact_dev_250.json",
    "known": "known_1000.json",
    "corpus": "corpus/wiki_vital_en.txt",
    "pararel": "pararel/data_all_allbags.json",
}


class MissingDataError(SystemExit):
    """An evaluation data file is not where the script looks for it (exits with the message)."""


def data_dir(data: str | os.PathLike | None = None) -> Path:
    """The data folder: `data` if given, else `$KVMEM_DATA` (`kvmem.datafiles.data_folder`), else
    `../shared/data` beside the repository. Not checked here: `data_file` says what is missing."""
    if data is not None:
        return Path(data).expanduser()
    return data_folder(SHARED_DATA, must_exist=False)


def add_data_arguments(ap: argparse.ArgumentParser, *names: str) -> None:
    """`--data DIR` and, for each name of `DATA_FILES`, `--<name> FILE` overriding that one file."""
    ap.add_argument("--data", default=None,
                    help=f"the evaluation data folder (default: ${DATA_ENV}, else ../shared/data beside the repository)")
    for name in names:
        ap.add_argument(f"--{name}", default=None, help=f"default: DATA/{DATA_FILES[name]}")


def data_name(args: argparse.Namespace, name: str) -> str:
    """The file name (no folder) that data option `name` refers to, whether or not it exists here:
    what a run log's settings record."""
    return Path(getattr(args, name, None) or DATA_FILES[name]).name


def data_file(args: argparse.Namespace, name: str, *, required: bool = True) -> str | None:
    """The file for data option `name`: `--<name>` if given, else the data folder's copy. Raises
    `MissingDataError` naming the path and the ways to point at the data when it does not exist
    (`required=False`: returns None instead)."""
    given = getattr(args, name, None)
    path = Path(given) if given is not None else data_dir(getattr(args, "data", None)) / DATA_FILES[name]
    if path.exists():
        return str(path)
    if not required:
        return None
    where = f"--{name}" if given is not None else f"the data folder {data_dir(getattr(args, 'data', None))}"
    raise MissingDataError(
        f"{path} not found (from {where}). The evaluation data lives outside the repository: pass "
        f"--data DIR or set {DATA_ENV}=DIR (default ../shared/data beside the repository), or --{name} FILE; "
        "docs/reproducing.md says where to get it.")


# --- peers ---------------------------------------------------------------------------------------

PEERS_ENV = "KVMEM_PEERS"

# Each peer's virtual environment inside the peers folder (benchmarks/peers/setup.sh makes them).
PEER_VENVS = {"causal-tracer": "ct-venv", "knowledge-neurons": "kn-venv"}


class MissingPeerError(SystemExit):
    """A peer's environment is not set up where the script looks (exits with the message)."""


def add_peer_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--peers", default=None,
                    help=f"the folder benchmarks/peers/setup.sh set the peers up in (default: ${PEERS_ENV})")
    ap.add_argument("--peer-python", default=None,
                    help="the peer environment's python (overrides --peers)")


def peer_python(args: argparse.Namespace, peer: str) -> str:
    """The python of `peer`'s environment: `--peer-python`, else `<--peers or $KVMEM_PEERS>/<venv>/bin/python`."""
    if getattr(args, "peer_python", None):
        path = Path(args.peer_python)
        if not path.exists():
            raise MissingPeerError(f"--peer-python {path} does not exist.")
        return str(path)
    folder = getattr(args, "peers", None) or os.environ.get(PEERS_ENV)
    setup = f"bash benchmarks/peers/setup.sh DIR, then pass --peers DIR or set {PEERS_ENV}=DIR"
    if not folder:
        raise MissingPeerError(f"{peer} runs in its own environment, and none was given: {setup}.")
    path = Path(folder).expanduser() / PEER_VENVS[peer] / "bin" / "python"
    if not path.exists():
        raise MissingPeerError(f"{path} not found: {peer} is not set up in {folder} ({setup}).")
    return str(path)


# --- provenance ----------------------------------------------------------------------------------

def git_commit() -> str:
    """The repository's commit (short hash), with "+changes" when the work tree differs from it;
    "unknown" outside a git checkout (e.g. a copy on a device machine)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=20)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=60)
        return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(script: str | os.PathLike, argv: Sequence[str] | None = None) -> str:
    """`python benchmarks/<script> ARGS` (argv None: this process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{Path(script).name}", *map(str, args)])


def machine(device: Any = None) -> str:
    """Architecture, cores, torch threads and, on a GPU, its name."""
    import torch

    text = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
    if device is not None and str(device).startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def provenance(script: str | os.PathLike, argv: Sequence[str] | None = None, device: Any = None) -> dict:
    """What a result file says about how it was made: command, git commit, machine, UTC date."""
    return {"command": command_line(script, argv), "commit": git_commit(), "machine": machine(device),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def provenance_line(p: dict) -> str:
    """One markdown sentence: "Measured by `COMMAND` (DATE, MACHINE; commit C)."."""
    return f"Measured by `{p['command']}` ({p['date']}, {p['machine']}; commit {p['commit']})."


# --- markdown tables ------------------------------------------------------------------------------

def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A markdown table; cells are written with str(). `align`: per column "l" or "r" (default
    left). (A DataFrame with its index: `kvmem.evaluation.markdown_table`.)"""
    rule = ["---:" if a == "r" else "---" for a in (align or ["l"] * len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- bootstrap -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BootstrapCI:
    lo: float
    hi: float
    defined: float  # share of the resamples where the statistic was defined (not NaN)


def bootstrap_values(statistic: Callable[..., float], *samples, n: int, rng) -> list[float]:
    """`statistic` on `n` resamples: each draws len(samples[0]) row indices with replacement
    (`rng.integers(0, m, m)`, one draw per resample, in order) and applies them to every sample
    alike (paired data stay paired)."""
    import numpy as np

    arrays = [np.asarray(s) for s in samples]
    m = len(arrays[0])
    if any(len(a) != m for a in arrays):
        raise ValueError(f"bootstrap samples differ in length: {[len(a) for a in arrays]}")
    values = []
    for _ in range(n):
        i = rng.integers(0, m, m)
        values.append(float(statistic(*(a[i] for a in arrays))))
    return values


def bootstrap_ci(statistic: Callable[..., float], *samples, n: int = 2000, seed: int = 0, rng=None,
                 level: float = 0.95) -> BootstrapCI:
    """Percentile bootstrap CI of `statistic(*samples)`: the (1 − level)/2 and (1 + level)/2
    percentiles of its values over `n` resamples (`bootstrap_values`), leaving out resamples where
    it is NaN (e.g. a rank correlation of a resample that came out constant; `defined` says how
    many were kept; a low share makes the CI unreliable). `rng`: a numpy Generator to draw from
    (shared by several CIs in turn); else a fresh `numpy.random.default_rng(seed)`."""
    import numpy as np

    rng = np.random.default_rng(seed) if rng is None else rng
    values = [v for v in bootstrap_values(statistic, *samples, n=n, rng=rng) if v == v]
    if not values:
        return BootstrapCI(float("nan"), float("nan"), 0.0)
    tail = round(50 * (1 - level), 12)  # 2.5 for 95%, exactly
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return BootstrapCI(float(lo), float(hi), len(values) / n)


def mean_difference(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of the paired differences a − b (NaN pairs left out) with its 95% bootstrap CI:
    {"diff", "ci": [lo, hi] (NaN with fewer than two pairs), "n"}."""
    import numpy as np

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[~np.isnan(d)]
    ci = bootstrap_ci(np.mean, d, n=n_boot, seed=seed) if len(d) > 1 else None
    return {"diff": float(d.mean()) if len(d) else float("nan"),
            "ci": [ci.lo, ci.hi] if ci else [float("nan"), float("nan")], "n": int(len(d))}


# --- resumable, shardable runs -----------------------------------------------------------------------
# `--shard`/`--merge` stay for one place Ray cannot serve: this project's GPU machines take files in
# transfers of at most 64 MiB and have no network, and Ray's wheel is 79 MB (docs/scaling.md). Where
# Ray installs, `--executor ray` (bench_diagnose.py; the kvmem batch commands) replaces them.

def add_run_arguments(ap: argparse.ArgumentParser, items: str) -> None:
    """The flags of a script whose items are logged one per line (kvmem.runs.RunLog): `--restart`,
    `--shard I/N`, `--merge N`, `--logged-only`, and `--device`. Check them with `check_run_arguments`."""
    ap.add_argument("--device", default=None,
                    help="torch device (default: TransformerLens's choice, cuda when available)")
    ap.add_argument("--restart", action="store_true", help="discard the run log and start over")
    ap.add_argument("--shard", default=None, help=f"I/N: compute every N-th of the {items} from the I-th, log only")
    ap.add_argument("--merge", type=int, default=None, metavar="N",
                    help=f"join the N shard logs into the run log, then summarise the logged {items}")
    ap.add_argument("--logged-only", action="store_true",
                    help=f"summarise the logged {items} without computing more")


def check_run_arguments(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (argparse errors) a malformed `--shard`, and flag combinations that would compute when
    asked to summarise, or discard the log being summarised."""
    from kvmem.errors import KvmemError
    from kvmem.runs import parse_shard

    if args.shard and (args.merge or args.logged_only):
        ap.error("--shard computes; it does not combine with --merge or --logged-only")
    if args.restart and (args.merge or args.logged_only):
        ap.error("--restart would discard the log that --merge / --logged-only summarise")
    if args.merge is not None and args.merge < 1:
        ap.error("--merge N needs N ≥ 1")
    try:
        parse_shard(args.shard)
    except KvmemError as e:
        ap.error(str(e))


@dataclass
class RunPlan:
    """One run's log and what this invocation does with it.

    A run logs one line per finished item to `log` and resumes from it when rerun. `--shard I/N`
    computes every N-th item (less those `log` already holds) into its own log `log.shardIofN.jsonl`
    and writes no summary; `--merge N` joins the N shard logs into `log`; `--merge` and
    `--logged-only` summarise what `log` holds without computing more.
    """

    log: Path
    shard: tuple[int, int] | None = None
    merge: int | None = None
    logged_only: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, log: str | os.PathLike) -> "RunPlan":
        """The plan of `add_run_arguments`' flags (checked by `check_run_arguments`) for the run logging to `log`."""
        from kvmem.runs import parse_shard

        return cls(Path(log), parse_shard(args.shard), args.merge, bool(args.logged_only))

    @property
    def summarising(self) -> bool:
        """Only summarise the run's log (`--merge` or `--logged-only`)."""
        return bool(self.merge) or self.logged_only

    @property
    def write_log(self) -> Path:
        """Where this invocation logs: the shard's own log, or the run's."""
        from kvmem.runs import shard_path

        return shard_path(self.log, self.shard)

    def shard_logs(self) -> list[Path]:
        from kvmem.runs import shard_path

        return [shard_path(self.log, (i, self.merge)) for i in range(self.merge or 0)]

    def merge_shards(self, items: str = "items") -> int | None:
        """With `--merge N`: join the shard logs that exist into the run's log (an item in two logs
        keeps its first record), print what was merged, return the log's item count."""
        from kvmem.runs import merge_run_logs

        if not self.merge:
            return None
        parts = [p for p in self.shard_logs() if p.exists()]
        n = merge_run_logs(parts, self.log)
        print(f"merged {len(parts)} shard logs into {self.log}: {n} {items}", flush=True)
        return n

    def logged(self) -> set[str]:
        """The keys of the items the run's own log holds."""
        from kvmem.runs import logged_keys

        return logged_keys(self.log)

    def select(self, items: Sequence, key: Callable[[Any], str]) -> list:
        """The items this invocation works on: when summarising, those the run's log holds; for a
        shard, its share less those the run's log already holds; else all (a plain run resumes
        by skipping logged items itself)."""
        from kvmem.runs import take_shard

        if self.summarising:
            done = self.logged()
            return [x for x in items if key(x) in done]
        if self.shard is not None:
            done = self.logged()
            return [x for x in take_shard(list(items), self.shard) if key(x) not in done]
        return list(items)


# --- process memory ----------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """Resident memory of this process now, in MB (NaN where /proc is missing)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (NaN where /proc is missing)."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux: /proc/self/clear_refs); False if
    that is not possible here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- the tests' reference implementations ------------------------------------------------------------

def reference():
    """`tests/reference.py`, the plain reference implementations the tests check kvmem against,
    imported from the tests folder (one definition shared by tests and benchmarks)."""
    module = sys.modules.get("reference")
    path = TESTS / "reference.py"
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == path:
        return module
    spec = importlib.util.spec_from_file_location("reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reference"] = module
    spec.loader.exec_module(module)
    return module


def pearson(a, b) -> float:
    """Pearson correlation of two tensors' entries (float64); NaN when either is constant."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


# --- a tiny random model, on either TransformerLens backend ----------------------------------------

def tiny_random_model(n_ctx: int = 128, seed: int = 0, device: Any = None, *, n_layers: int = 3,
                      d_model: int = 32, n_heads: int = 4, d_mlp: int = 64):
    """A seeded random GPT-2 (default 3 layers, d_model 32, 4 heads, d_mlp 64; the real GPT-2
    vocabulary and tokenizer) loaded through `kvmem.load_model`'s folder path, so it is a HookedTransformer on
    TransformerLens 3.9 and a TransformerBridge on 4.x. For end-to-end runs of the scripts' plumbing
    (`--model tiny`); its numbers mean nothing. Weights drawn at HookedTransformer's scale
    (0.8/sqrt(d_model)) so its outputs are not near uniform."""
    import tempfile

    import torch
    import transformers

    from kvmem.models.folder import load_hf_folder
    from kvmem.models.tokenizers import gpt2_tokenizer

    config = transformers.GPT2Config(vocab_size=50257, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                                     n_inner=d_mlp, n_positions=n_ctx, activation_function="gelu_new",
                                     initializer_range=0.8 / d_model ** 0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory(prefix="kvmem-tiny-") as folder:
        hf.save_pretrained(folder)
        model = load_hf_folder(folder, device=device, tokenizer=gpt2_tokenizer())
    model.eval()
    return model
