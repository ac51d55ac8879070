"""Run `causal-tracer==1.1.0` (PyPI) on one fact, in the peer's OWN virtual environment.

Started by `benchmarks/bench_tracing_peer.py` as a subprocess:

    $KVMEM_PEERS/ct-venv/bin/python benchmarks/peer_causal_tracer_runner.py SPEC.json OUT.jsonl

(the environment `benchmarks/peers/setup.sh` makes).

It imports nothing from kvmem (kvmem is not installed in that environment). SPEC.json:

    {"model_dir": HF folder, "prompt": str, "subject": str, "answer_id": int,
     "expected_ids": [int] (kvmem's tokens, checked), "threads": 1, "batch_size": 32,
     "jobs": [{"name": str, "noise": float, "samples": int, "patch_seed": int,
               "kinds": [["hidden", 1], ["mlp", 10], ["attention", 10]],
               "end_layer": null or k (only the cells of layers [0, k), for timing)}, ...]}

Writes one JSON line per finished (job, kind) as soon as it is done (so a run stopped by a
timeout keeps what it finished), then a final {"done": true} line. Each line holds the peer's
score grid transposed to kvmem's `[layer, pos]` layout, its low (corrupted) and high (clean)
scores, the tokens it used, its subject range and the wall and CPU (`time.process_time`) seconds
`calculate_hidden_flow` took.
"""

from __future__ import annotations

import json
import os
import sys
import time


def log(out, record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def load_model(model_dir: str):
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    config_fixes = {}
    # A folder written by transformers 5 keeps RoPE bases in `rope_parameters`, which transformers 4
    # does not read (it falls back to its defaults). Copy them into the fields 4.x reads, so the
    # model is the same whichever defaults this version has.
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and int(transformers.__version__.split(".")[0]) < 5:
        if "full_attention" in rope and "rope_theta" in rope["full_attention"]:
            config_fixes["rope_theta"] = float(rope["full_attention"]["rope_theta"])
        if "sliding_attention" in rope and "rope_theta" in rope["sliding_attention"]:
            config_fixes["rope_local_base_freq"] = float(rope["sliding_attention"]["rope_theta"])
        if "rope_theta" in rope:
            config_fixes["rope_theta"] = float(rope["rope_theta"])
        for k, v in config_fixes.items():
            setattr(config, k, v)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float32, local_files_only=True
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tokenizer, config_fixes


def layer_config_for(model):
    """causal-tracer knows gpt2 / gptj / llama by `model_type`; Gemma-3 needs a LayerConfig."""
    from causal_tracer import LayerConfig
    from causal_tracer.causal_tracing.LayerConfig import get_layer_config

    try:
        return get_layer_config(model), "built-in"
    except ValueError:
        names = dict(model.named_modules())
        if "model.layers.0" in names and "model.embed_tokens" in names:
            return (
                LayerConfig(
                    hidden_layers_matcher="model.layers.{num}",
                    attention_layers_matcher="model.layers.{num}.self_attn",
                    mlp_layers_matcher="model.layers.{num}.mlp",
                    embedding_layer="model.embed_tokens",
                ),
                "custom (model.layers.{num}[.self_attn|.mlp], model.embed_tokens)",
            )
        raise


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    spec = json.loads(open(spec_path, encoding="utf-8").read())
    threads = int(spec.get("threads", 1))
    import torch

    torch.set_num_threads(threads)
    import causal_tracer
    import transformers
    from causal_tracer import CausalTracer
    from causal_tracer.causal_tracing.pick_noise_level import pick_noise_level

    with open(out_path, "w", encoding="utf-8") as out:
        t0 = time.perf_counter()
        model, tokenizer, config_fixes = load_model(spec["model_dir"])
        for p in model.parameters():
            p.requires_grad_(False)
        layer_config, layer_config_kind = layer_config_for(model)
        t_load = time.perf_counter() - t0
        default_noise = pick_noise_level(model, layer_config.embedding_layer)
        tracer = CausalTracer(model, tokenizer, layer_config=layer_config, device=torch.device("cpu"))
        ids = tokenizer([spec["prompt"]])["input_ids"][0]
        ids = [int(i) for i in ids]
        log(out, {
            "meta": True,
            "causal_tracer": causal_tracer.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_seconds": round(t_load, 3),
            "n_layers": tracer.count_layers(),
            "input_ids": ids,
            "ids_match_kvmem": ids == spec.get("expected_ids", ids),
            "default_noise": default_noise,
            "layer_config": layer_config_kind,
            "config_fixes": config_fixes,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        })
        # warm-up: one clean forward (kvmem is warmed up with a 2-sample trace)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        for job in spec["jobs"]:
            # CausalTracer.__init__ does `noise or pick_noise_level(...)`: a 0.0 passed there would
            # silently become the default, so the scale is set on the attribute.
            tracer.noise = float(job["noise"])
            for kind, window in job["kinds"]:
                t, c = time.perf_counter(), time.process_time()
                flow = tracer.calculate_hidden_flow(
                    spec["prompt"],
                    subject=spec["subject"],
                    kind=kind,
                    answer_id_override=int(spec["answer_id"]),
                    samples=int(job["samples"]),
                    window=int(window),
                    patch_seed=int(job.get("patch_seed", 1)),
                    batch_size=int(spec.get("batch_size", 32)),
                    end_layer=job.get("end_layer"),
                )
                seconds, cpu = time.perf_counter() - t, time.process_time() - c
                log(out, {
                    "job": job["name"],
                    "kind": kind,
                    "window": int(window),
                    "end_layer": job.get("end_layer"),
                    "samples": int(job["samples"]),
                    "noise": float(job["noise"]),
                    "seconds": round(seconds, 3),
                    "cpu_seconds": round(cpu, 3),
                    "scores": flow.scores.T.tolist(),  # peer: [token, layer] -> [layer, pos]
                    "low_score": float(flow.low_score),
                    "high_score": float(flow.high_score),
                    "input_ids": [int(i) for i in flow.input_ids],
                    "subject_range": list(flow.subject_range),
                    "answer": flow.answer,
                })
        log(out, {"done": True, "total_seconds": round(time.perf_counter() - t0, 3)})


if __name__ == "__main__":
    main()
