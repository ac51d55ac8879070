"""Convert Gemma-3-270m once into kvmem's cache on a fresh machine, so that the parallel workers
of benchmarks/device/main.sh load it from the cache instead of each converting the GGUF, and
compute the C statistics every worker needs at the start (else each computes its own copy).
`prepare.py L1 L2 ...` computes C for those layers instead (main.sh runs it in the background for
the layers diagnose may pick, so that shards find them cached rather than each computing them).
Run with the repository and benchmarks/ on PYTHONPATH (setup.sh and main.sh set it)."""

import sys
import time

import torch

import kvmem
from common import DATA_FILES, data_dir
from kvmem.editing import rome_hparams, second_moment
from kvmem.core.fingerprint import model_fingerprint

t = time.perf_counter()
model = kvmem.load_model("gemma-3-270m", device="cuda" if torch.cuda.is_available() else "cpu")
print(f"gemma-3-270m loaded in {time.perf_counter() - t:.0f} s on {model.cfg.device}; "
      f"fingerprint {model_fingerprint(model)[:20]}", flush=True)

# The stress test's layers (the preset layer ± 2, which bench_stress computes for every variant)
# at the 200k tokens main.sh's runs use; diagnose's other layers are computed where needed.
corpus = str(data_dir() / DATA_FILES["corpus"])  # $KVMEM_DATA, else ../shared/data beside the repository
layer = rome_hparams(model).layer
layers = [int(a) for a in sys.argv[1:]] or range(max(0, layer - 2), min(model.cfg.n_layers, layer + 3))
for l in layers:
    t = time.perf_counter()
    second_moment(model, l, corpus, n_tokens=200_000, progress=False)
    print(f"C at layer {l} ready in {time.perf_counter() - t:.0f} s", flush=True)
