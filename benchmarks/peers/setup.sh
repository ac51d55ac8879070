#!/usr/bin/env bash
# Set up the peer implementations the benchmarks compare kvmem with, each in its own virtual
# environment (both pin transformers<5; kvmem needs transformers>=5.24, so they cannot share its):
#
#   DIR/ct-venv   causal-tracer==1.1.0      (benchmarks/bench_tracing_peer.py)
#   DIR/kn-venv   knowledge-neurons==0.0.2  (benchmarks/bench_neurons.py speed / peer)
#
# Usage:
#   bash benchmarks/peers/setup.sh DIR                      both peers into DIR
#   bash benchmarks/peers/setup.sh DIR causal-tracer        one of them (or knowledge-neurons)
#   bash benchmarks/peers/setup.sh DIR check                report what DIR holds, install nothing
# DIR defaults to $KVMEM_PEERS. Afterwards pass `--peers DIR` to the scripts or `export KVMEM_PEERS=DIR`.
#
# Needs python3 (3.10+, with venv) and access to PyPI and the PyTorch wheel index. Settings:
#   PYTHON       the python that makes the environments (default python3)
#   TORCH        the torch requirement (default torch==2.13.0, the version the committed results used)
#   TORCH_INDEX  where torch comes from (default the CPU-only wheels, https://download.pytorch.org/whl/cpu;
#                set it empty, TORCH_INDEX=, where pip's own configuration already provides a CPU torch)
set -euo pipefail

DIR=${1:-${KVMEM_PEERS:-}}
WHAT=${2:-all}
if [ -z "$DIR" ]; then
  echo "usage: bash benchmarks/peers/setup.sh DIR [causal-tracer|knowledge-neurons|check]  (DIR default: \$KVMEM_PEERS)" >&2
  exit 2
fi
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}

check() {  # venv, import name, package name: prints the installed versions or what is missing
  local py="$DIR/$1/bin/python"
  if [ ! -x "$py" ]; then echo "$3: not set up ($py missing)"; return 1; fi
  "$py" -c "import importlib.metadata as m, torch, transformers, $2; \
print('$3', m.version('$3'), '| torch', torch.__version__, '| transformers', transformers.__version__)"
}

make_venv() {  # venv name, then the pip requirements installed after torch
  local venv="$DIR/$1"; shift
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --upgrade pip
  # torch first, from the CPU wheel index, so the peer's own requirements find it satisfied
  local index=() extra=()
  if [ -n "$TORCH_INDEX" ]; then index=(--index-url "$TORCH_INDEX"); extra=(--extra-index-url "$TORCH_INDEX"); fi
  "$venv/bin/pip" install "$TORCH" "${index[@]}"
  "$venv/bin/pip" install "$TORCH" "$@" "${extra[@]}"
}

case "$WHAT" in
  check)
    status=0
    check ct-venv causal_tracer causal-tracer || status=1
    check kn-venv knowledge_neurons knowledge-neurons || status=1
    exit $status ;;
  all|causal-tracer|knowledge-neurons) ;;
  *) echo "unknown peer '$WHAT': causal-tracer, knowledge-neurons or check" >&2; exit 2 ;;
esac
mkdir -p "$DIR"
if [ "$WHAT" != knowledge-neurons ]; then
  make_venv ct-venv causal-tracer==1.1.0  # pulls transformers 4.57.x through its own transformers<5 pin
  check ct-venv causal_tracer causal-tracer
fi
if [ "$WHAT" != causal-tracer ]; then
  make_venv kn-venv knowledge-neurons==0.0.2 "transformers<5"
  check kn-venv knowledge_neurons knowledge-neurons
fi
echo "peers ready in $DIR: pass --peers $DIR to the benchmark scripts, or export KVMEM_PEERS=$DIR"
