"""Shared fixtures: tiny random models of the two architecture families kvmem must support."""

from __future__ import annotations

from pathlib import Path

# Every kvmem function's jaxtyping shapes and type hints are checked at run time in the tests
# (beartype; typeguard silently skips jaxtyping's dimension strings). The hook must be installed
# before kvmem is first imported.
from jaxtyping import install_import_hook

install_import_hook("kvmem", "beartype.beartype")

import pytest  # noqa: E402
import torch  # noqa: E402

from kvmem.models.tokenizers import gpt2_tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
