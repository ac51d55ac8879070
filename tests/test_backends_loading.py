"""Loading on the installed TransformerLens: HookedTransformer (3.9) or TransformerBridge (>= 4.3).

Every test here runs on whichever TransformerLens is installed (nothing skips the default path):
the same file, run in a TransformerLens 3 and a TransformerLens 4 environment, checks that both
load the same weights offline, tokenize the same, and fingerprint the same weights the same
(`weights_fingerprint` below is one constant for both backends).
"""

from __future__ import annotations


import pytest
import torch
from conftest import forbid_network

import kvmem
import kvmem.models as om
from kvmem.core.backend import backend_of, installed_backend
from kvmem.core.fingerprint import (
    canonical_weights,
    model_fingerprint,
    same_weights,
    weights_fingerprint,
)
from kvmem.errors import InvalidArgumentError, MissingDependencyError

BACKEND = installed_backend()
OTHER = "bridge" if BACKEND == "hooked" else "hooked"
KIND = {"hooked": "HookedTransformer", "bridge": "TransformerBridge"}

# The shipped factworld weights, processed as HookedTransformer.from_pretrained does: the same
# backend-independent fingerprint on both backends; the HookedTransformer's own fingerprint is the
# one recorded in committed results (benchmarks/results/tracing/aie_factworld.jsonl,
# tests/data/stress_log_v1.jsonl).
FACTWORLD_WEIGHTS_FP = "b57c331cbe633d61fbdfc4b3fdfef5d1d3b50f8b000195a96fb4053146104ec5"
FACTWORLD_HOOKED_FP = "359765b067d6959863032276d5fcc143c14bfdb1f8468ffdf6693af4706ac2f2"
GEMMA_WEIGHTS_FP = "d0700c5a6a112ab13753243c7efeeb99dbda61a453f613960dc18d5c70e1280e"
GEMMA_HOOKED_FP = "411abb107180b1d3838e1511da638a3d5954f2bebec2c980eb47a7473b61ca79"


@pytest.fixture(scope="module")
def offline():
    """No hub: HF_HUB_OFFLINE=1, and any non-local connection fails loudly."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        forbid_network(mp)
        yield


@pytest.fixture(scope="module")
def fw(offline, tmp_path_factory):
    return kvmem.load_model("factworld", device="cpu", cache_dir=tmp_path_factory.mktemp("kvmem-cache"))


# --- factworld on the installed backend -----------------------------------------------------------


def test_factworld_loads_on_the_installed_backend(fw):
    from kvmem.factworld import factworld_tokenizer, load_factworld_hf, shipped_world

    assert type(fw).__name__ == KIND[BACKEND] and backend_of(fw) == BACKEND
    assert fw.cfg.model_name == "factworld" and not fw.training
    assert next(fw.parameters()).dtype == torch.float32
    fact = shipped_world().facts("train")[3]
    tokens = fw.to_tokens(fact.prompt)
    assert tokens[0, 0].item() == 50256  # BOS (<|endoftext|>), as in training
    assert tokens[0, 1:].tolist() == factworld_tokenizer().encode(fact.prompt, add_special_tokens=False)
    hf, _ = load_factworld_hf()
    with torch.no_grad():
        ours = fw(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert ours[0, -1].argmax().item() == fw.to_single_token(fact.target)


def test_factworld_model_is_the_installed_backends(fw):
    from kvmem.factworld import factworld_hooked_transformer, factworld_model

    model = factworld_model(device="cpu")
    assert type(model).__name__ == KIND[BACKEND]
    assert model_fingerprint(model) == model_fingerprint(fw)
    if BACKEND == "bridge":
        with pytest.raises(MissingDependencyError, match=r"kvmem.load_model\('factworld'\)"):
            factworld_hooked_transformer()
    else:
        assert model_fingerprint(factworld_hooked_transformer(device="cpu")) == FACTWORLD_HOOKED_FP


def test_dtype_is_applied(offline):
    model = kvmem.load_model("factworld", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(model.to_tokens("Chox Shyty lives in the city of")).isfinite().all()


# --- choosing a backend -------------------------------------------------------------------------


def test_other_backend_says_which_transformer_lens_to_install(tmp_path):
    want = ">=3.9,<4" if OTHER == "hooked" else ">=4.3"
    with pytest.raises(MissingDependencyError, match=rf"backend='{OTHER}'.*{KIND[OTHER]}.*transformer-lens{want}"):
        kvmem.load_model("factworld", backend=OTHER)
    with pytest.raises(MissingDependencyError, match="transformer-lens"):
        om.load_gemma_3_270m(backend=OTHER)
    with pytest.raises(MissingDependencyError, match="transformer-lens"):
        om.load_hf_folder(tmp_path, backend=OTHER)
    with pytest.raises(InvalidArgumentError, match="backend must be one of"):
        kvmem.load_model("factworld", backend="raw")
    assert om.resolve_backend(None) == om.resolve_backend(BACKEND) == BACKEND


def test_unknown_name_offline(offline):
    from kvmem.errors import UnknownModelError

    with pytest.raises(UnknownModelError, match="Offline choices"):
        kvmem.load_model("no-such-model-anywhere")
    with pytest.raises(UnknownModelError, match="could not be fetched from the Hugging Face hub"):
        kvmem.load_model("gpt2")  # an official TransformerLens name: needs the hub


# --- fingerprints -----------------------------------------------------------------------------------


def test_weights_fingerprint_is_the_same_on_both_backends(fw):
    """The same constant in both environments: the compatibility-mode bridge processes the shipped
    weights bit for bit as HookedTransformer does."""
    assert weights_fingerprint(fw) == FACTWORLD_WEIGHTS_FP
    expected_model_fp = FACTWORLD_HOOKED_FP if BACKEND == "hooked" else FACTWORLD_WEIGHTS_FP
    assert model_fingerprint(fw) == expected_model_fp
    names = set(canonical_weights(fw))
    assert {"embed.W_E", "pos_embed.W_pos", "unembed.W_U", "blocks.0.mlp.W_out", "blocks.3.attn.W_Q"} <= names
    assert not any(n.startswith("blocks.0.ln1") for n in names)  # folded LayerNorm: left out


def test_fingerprints_follow_every_weight(fw):
    W = fw.blocks[1].mlp.W_out
    before = (model_fingerprint(fw), weights_fingerprint(fw))
    old = W[0, 0].item()
    with torch.no_grad():
        W[0, 0] += 1e-3
    try:
        after = (model_fingerprint(fw), weights_fingerprint(fw))
        assert after[0] != before[0] and after[1] != before[1]
        ok, why = same_weights(fw, *before, made_on=BACKEND)
        assert not ok and "differ" in why
    finally:
        with torch.no_grad():
            W[0, 0] = old
    assert (model_fingerprint(fw), weights_fingerprint(fw)) == before


def test_records_from_either_backend(fw):
    """What `same_weights` accepts: a record with the backend-independent fingerprint from either
    backend; a HookedTransformer-only record (made before kvmem recorded both) only on a
    HookedTransformer, and on a bridge it is refused with the reason."""
    assert same_weights(fw, FACTWORLD_WEIGHTS_FP) == (True, "")  # made on a bridge
    assert same_weights(fw, FACTWORLD_HOOKED_FP, FACTWORLD_WEIGHTS_FP, made_on="hooked") == (True, "")
    ok, why = same_weights(fw, FACTWORLD_HOOKED_FP)  # an old HookedTransformer record
    if BACKEND == "hooked":
        assert ok
    else:
        assert not ok and "records only a HookedTransformer fingerprint" in why


# --- the cache does not depend on the TransformerLens version ---------------------------------------


def test_cache_software_excludes_transformer_lens():
    from kvmem.models.cache import same_software, software_versions, variant_software_ok

    now = software_versions()
    assert "transformer_lens" not in now
    assert same_software({**now, "transformer_lens": "0.1"})  # older manifests listed it: ignored
    assert not same_software({**now, "transformers": "0.0"})
    mine = om.cache.transformer_lens_version()
    assert variant_software_ok({"software": {}}, {"transformer_lens": mine})
    assert not variant_software_ok({"software": {}}, {"transformer_lens": "0.1"})
    # an entry made before variants recorded it: the manifest's version of its time stands for it
    assert variant_software_ok({"software": {"transformer_lens": mine}}, {})
    assert not variant_software_ok({"software": {"transformer_lens": "0.1"}}, {})


# --- a local Hugging Face folder --------------------------------------------------------------------


def test_hf_folder_on_the_installed_backend(tmp_path, offline):
    from transformers import GPT2Config, GPT2LMHeadModel

    from kvmem.models.tokenizers import gpt2_tokenizer

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64)).eval()
    folder = tmp_path / "tiny-gpt2"
    hf.save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    model = kvmem.load_model(folder, device="cpu")
    assert backend_of(model) == BACKEND and model.cfg.model_name == "tiny-gpt2"
    tokens = model.to_tokens("The capital of France is")
    assert tokens[0, 0].item() == 50256 and (tokens[0] == 50256).sum() == 1
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).log_softmax(-1), hf(tokens).logits.log_softmax(-1),
                                   atol=1e-4, rtol=0)


# --- the real models ----------------------------------------------------------------------------------


def _load_or_skip(name):
    try:
        return kvmem.load_model(name, device="cpu")
    except MissingDependencyError as e:
        pytest.skip(f"real model not installed: {e}")


@pytest.mark.real
def test_gemma_on_the_installed_backend(offline):
    gemma = _load_or_skip("gemma-3-270m")
    assert backend_of(gemma) == BACKEND and gemma.cfg.model_name == "gemma-3-270m"
    text, ids = om.MODELS[om.GEMMA_3_270M].tokenizer_probe
    assert tuple(gemma.to_tokens(text)[0].tolist()) == ids  # <bos> first: the known answer
    with torch.no_grad():
        logits = gemma(gemma.to_tokens("The Eiffel Tower is located in the city of"))[0, -1]
    assert gemma.tokenizer.decode(logits.argmax()) == " Paris"
    assert weights_fingerprint(gemma) == GEMMA_WEIGHTS_FP  # the same on both backends
    assert model_fingerprint(gemma) == (GEMMA_HOOKED_FP if BACKEND == "hooked" else GEMMA_WEIGHTS_FP)


@pytest.mark.real
def test_smollm2_start_token_on_the_installed_backend(offline):
    smol = _load_or_skip("smollm2-135m")
    assert backend_of(smol) == BACKEND
    text, ids = om.MODELS[om.SMOLLM2_135M].tokenizer_probe
    assert tuple(smol.to_tokens(text)[0].tolist()) == ids
    assert smol.tokenizer.convert_ids_to_tokens(ids[0]) == om.START_TOKENS[om.SMOLLM2_135M] == "<|endoftext|>"
