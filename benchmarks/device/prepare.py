"""Convert Gemma-3-270m once into kvmem's cache on a fresh machine, so that the parallel workers
of benchmarks/device/main.sh load it from the cache instead of each converting the GGUF."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import kvmem  # noqa: E402
from kvmem.editing.fingerprint import model_fingerprint  # noqa: E402

t = time.perf_counter()
model = kvmem.load_model("gemma-3-270m", device="cuda" if torch.cuda.is_available() else "cpu")
print(f"gemma-3-270m loaded in {time.perf_counter() - t:.0f} s on {model.cfg.device}; "
      f"fingerprint {model_fingerprint(model)[:20]}", flush=True)

# C statistics the workers share, computed once here (else each worker computes its own copy):
# the ROME table's edit layer at 200k tokens; the stress test's layers (2-6) and diagnose's likely
# peaks (0-9) at their default max(20,000, 50 x d_mlp) tokens (other layers: computed on demand).
from kvmem.editing import second_moment  # noqa: E402

corpus = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "corpus" / "wiki_vital_en.txt")
t = time.perf_counter()
second_moment(model, 4, corpus, n_tokens=200_000, progress=False)
n_tok = max(20_000, 50 * int(model.cfg.d_mlp))
for layer in range(10):
    second_moment(model, layer, corpus, n_tokens=n_tok, progress=False)
print(f"C statistics ready in {time.perf_counter() - t:.0f} s", flush=True)

# The AIE workers' noise (3 x std of the subject embeddings over all chosen known facts), once.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trace_known_facts  # noqa: E402

out = Path("/root/out")
out.mkdir(parents=True, exist_ok=True)
chosen = trace_known_facts.main(["--model", "gemma-3-270m", "--n-facts", "100000", "--choose-only",
                                 "--device", str(model.cfg.device)])
(out / "aie_noise.txt").write_text(repr(float(chosen["noise"])))
print(f"AIE: {chosen['facts_chosen']} known facts chosen, noise {chosen['noise']:.6g}", flush=True)
