"""Shared fixtures: tiny random models of the two architecture families kvmem must support, and
the shipped factworld model (the default) with its world."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Every kvmem function's jaxtyping shapes and type hints are checked at run time in the tests
# (beartype; typeguard silently skips jaxtyping's dimension strings). The hook must be installed
# before kvmem is first imported.
from jaxtyping import install_import_hook

install_import_hook("kvmem", "beartype.beartype")

import pytest  # noqa: E402
import torch  # noqa: E402

from kvmem.datafiles import data_folder  # noqa: E402
from kvmem.models.tokenizers import gpt2_tokenizer  # noqa: E402

# Evaluation data that is not shipped (known facts, CounterFact, PARAREL, corpora): the library's
# data folder ($KVMEM_DATA, `kvmem.datafiles.data_folder`), as for users and the benchmarks, else the
# project's shared data folder beside the checkout (which users do not have).
SHARED_DATA = data_folder(Path(__file__).resolve().parents[1].parent / "shared" / "data", must_exist=False)


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared evaluation data not found at {path}")
    return path


def _tiny(kind: str, seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    common = dict(
        n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64,
        d_vocab=50257, default_prepend_bos=True, seed=seed, dtype=torch.float32,
    )
    if kind == "gpt2":
        cfg = HookedTransformerConfig(
            **common, act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
        )
    elif kind == "gated":
        # Llama/Gemma-like: RMSNorm, rotary, gated MLP, grouped-query attention.
        cfg = HookedTransformerConfig(
            **common, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
            rotary_dim=8, gated_mlp=True, n_key_value_heads=2, final_rms=True,
        )
    else:
        raise ValueError(kind)
    model = HookedTransformer(cfg, tokenizer=gpt2_tokenizer())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a shared 2-core box thrash.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def _shared_factworld():
    import kvmem

    return kvmem.load_model("factworld")


@pytest.fixture(scope="session")
def factworld(_shared_factworld, _factworld_as_loaded):
    """The shipped default model, exactly as `kvmem.load_model("factworld")` returns it, loaded
    once per session. A failed load is an error, never a skip: a broken default must fail the
    suite. Tests share it, so none may leave it changed (checked by `_factworld_left_unchanged`)."""
    return _shared_factworld


@pytest.fixture(scope="session")
def world():
    """The fact world the shipped factworld model was trained on (`kvmem.factworld.shipped_world()`)."""
    from kvmem.factworld import shipped_world

    return shipped_world()


def _model_state(model) -> tuple[str, list[bool]]:
    """A digest of every weight's exact bits, and each weight's requires_grad flag."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest(), [p.requires_grad for p in model.parameters()]


@pytest.fixture(scope="session")
def _factworld_as_loaded(_shared_factworld):
    return _model_state(_shared_factworld)  # taken at load, before any test or fixture uses the model


@pytest.fixture(autouse=True)
def _factworld_left_unchanged(request):
    """After each test that uses the shared factworld model: its weights (an edit left applied, or
    undone only up to rounding), gradient flags, gradients and hooks are as loaded, so no test's
    result depends on which tests ran before it."""
    if "_shared_factworld" not in request.fixturenames:
        yield
        return
    model = request.getfixturevalue("_shared_factworld")
    loaded = request.getfixturevalue("_factworld_as_loaded")
    yield
    culprit = "the first test reporting this left the shared factworld model changed"
    weights, flags = _model_state(model)
    assert weights == loaded[0], f"{culprit}: its weights"
    assert flags == loaded[1], f"{culprit}: requires_grad"
    assert all(p.grad is None for p in model.parameters()), f"{culprit}: gradients on its weights"
    left = [name for name, hp in model.hook_dict.items() if hp._forward_hooks or hp._backward_hooks]
    assert not left, f"{culprit}: hooks at {left}"


@pytest.fixture(scope="session")
def tiny_gpt2():
    """3-layer random GPT-2-architecture HookedTransformer with the real GPT-2 tokenizer."""
    return _tiny("gpt2")


@pytest.fixture(scope="session")
def tiny_gated():
    """3-layer random Llama-like HookedTransformer (RMSNorm, rotary, gated MLP, GQA)."""
    return _tiny("gated")


@pytest.fixture(scope="session", params=["gpt2", "gated"])
def tiny_model(request):
    return _tiny(request.param)


def _tiny_postnorm():
    """Gemma-2/3-like: RMSNorm before *and after* attention and MLP (ln2_post, with a random gain)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from kvmem.models.tokenizers import gpt2_tokenizer

    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=50257,
        default_prepend_bos=True, seed=1, dtype=torch.float32, act_fn="gelu_pytorch_tanh",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, gated_mlp=True,
        use_normalization_before_and_after=True, final_rms=True,
    )
    model = HookedTransformer(cfg, tokenizer=gpt2_tokenizer())
    model.eval()
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        block.ln2_post.w.copy_(0.5 + torch.rand(32, generator=g))
        block.mlp.b_out.copy_(0.1 * torch.randn(32, generator=g))
    return model


@pytest.fixture(scope="session")
def tiny_postnorm():
    """3-layer random Gemma-2/3-like HookedTransformer (norms before and after attention and MLP)."""
    return _tiny_postnorm()
