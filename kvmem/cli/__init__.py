"""The `kvmem` command: the demo, and batch jobs over fact files from the shell. A thin layer
over the library: each command reads its options, calls kvmem's functions and writes files.

    kvmem demo                                    # one factworld fact, four analyses -> kvmem-demo/report.html
    kvmem models                                  # what can be loaded offline
    kvmem trace                                   # causal trace of a factworld fact -> kvmem-trace/
    kvmem trace --model gemma-3-270m --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --target Paris
    kvmem facts --out facts.json --n 20           # factworld facts as a CounterFact-format file
    kvmem trace --facts facts.json --out runs/trace      # average indirect effect over a data set
    kvmem neurons --facts facts.json --out runs/neurons  # knowledge neurons per fact
    kvmem edit --facts facts.json --out runs/edit        # ROME edit + CounterFact metrics per fact
    kvmem stats --layers 1 --out runs/stats              # second-moment statistics for ROME
    kvmem recall --model gemma-3-270m --facts known_1000.json --limit 200   # found in $KVMEM_DATA

`--facts` and `--corpus` take a path, or a name in the evaluation data folder `$KVMEM_DATA`
(`kvmem.datafiles.data_path`); a missing file is reported before the model loads. Batch commands
read fact files (`kvmem.data.read_fact_file`: known_1000, CounterFact or simple
`{"prompt", "subject", "target", ...}` records); they log each finished fact to
`<out>/<command>_log.jsonl` (`kvmem.runs.RunLog`) and, run again with the same settings, skip the
facts already done. A malformed record is reported by its index; `--on-error skip` goes on
without it. Every output file is written to a temporary file and renamed.

Modules: `parser` (the options), `common` (output folder, atomic writes, messages, model
loading), `batch` (fact files and resumable runs), `options` (facts, corpus and statistics from
the options), one module per command.
"""

from __future__ import annotations

import warnings

from kvmem.cli import runtime
from kvmem.cli.common import warn
from kvmem.cli.parser import build_parser
from kvmem.errors import KvmemError, KvmemWarning, TargetCheckError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: usage + message, exit 2
    try:
        runtime.resolve(args)  # default --out per model, --device checked, --threads set
        return _run(args)
    except KvmemError as e:
        warn(e)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        warn(f"interrupted. Finished facts are kept{f' in {out}' if out else ''}; "
             "run the same command again to resume.")
        return 130
    except OSError as e:  # a disk or permission problem outside kvmem's own checks
        warn(f"{e.strerror or e}: {getattr(e, 'filename', '') or ''}. Check the paths and free space.")
        return 2


def _run(args) -> int:
    """The command, its `KvmemWarning`s printed as one "kvmem: warning: ..." line each, or, under
    --strict, raised as a `TargetCheckError`."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, KvmemWarning):
            warn(f"warning: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        if getattr(args, "strict", False):
            warnings.simplefilter("error", KvmemWarning)
        try:
            return args.func(args)
        except KvmemWarning as w:
            raise TargetCheckError(f"{w} (an error under --strict; without it, kvmem goes on with a "
                                   "warning).") from None


__all__ = ["main", "build_parser"]
