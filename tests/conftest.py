"""Shared fixtures: tiny random models of the architecture families kvmem must support, and the
shipped factworld model (the default) with its world; and which tests run on which backend.

kvmem runs on TransformerLens 3.9 (`HookedTransformer`, backend "hooked") and TransformerLens >= 4.3
(`TransformerBridge` in compatibility mode, backend "bridge"); the installed one decides
(`kvmem.core.backend.installed_backend`). The tiny models are built on it: HookedTransformers from
a `HookedTransformerConfig` on 3.9 (exactly as before: golden values depend on them), bridges over
a seeded random Hugging Face model of the same sizes on 4.x (`_tiny_bridge`).

Markers (set here, in `pytest_collection_modifyitems`, from `CORE_TESTS` and `ONLY_ON`):
- `core`: the subset CI also runs on the other backend (`pytest -m core` in .ci/run's second venv);
- tests that can only run on one backend are skipped on the other, the reason in the message.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Every kvmem function's jaxtyping shapes and type hints are checked at run time in the tests
# (beartype; typeguard silently skips jaxtyping's dimension strings). The hook must be installed
# before kvmem is first imported.
from jaxtyping import install_import_hook

install_import_hook("kvmem", "beartype.beartype")

import pytest  # noqa: E402
import torch  # noqa: E402

from kvmem.core.backend import installed_backend  # noqa: E402
from kvmem.datafiles import data_folder  # noqa: E402
from kvmem.models.tokenizers import gpt2_tokenizer  # noqa: E402

BACKEND = installed_backend()  # "hooked" (TransformerLens 3.9) or "bridge" (TransformerLens >= 4.3)

# --- which tests run where ----------------------------------------------------------------------

# The core subset (marker `core`): what CI also runs on the other TransformerLens, in a second
# virtual environment (.ci/run). Entries are test modules (file stem) or "module::test_name" for a
# few tests of a module (the parametrised variants included). One list, here.
CORE_TESTS: tuple[str, ...] = (
    "test_hooks",             # kvmem's hooks in run_with_hooks
    "test_patching",          # the batched intervention engine, activation patching
    "test_tracing",           # causal tracing: kinds, severing, windows, positions
    "test_attribution",       # attribution tracing against the exact trace
    "test_neurons",           # integrated gradients, knowledge neurons
    "test_editing",           # ROME: statistics, k*, v*, the update, restore, save/load
    "test_editing_factworld",
    "test_interference",      # predict_interference: the update's algebra against the applied edit
    "test_evaluation",        # CounterFact metrics
    "test_four_views",        # the demo's pipeline
    "test_mlp_layout",        # (its HookedTransformer-only tests skip on a bridge; see ONLY_ON)
    "test_backends",          # the two backends side by side (where both can be built)
    "test_backends_loading",
    "test_golden",            # golden values: bit for bit on 3.9, within tolerance on a bridge
    "test_cli::test_demo",    # the demo command and its report
    "test_cli::test_trace_single_fact",
    "test_cli::test_edit",
)

# Tests that only apply to one backend, with the reason the other skips them. A test of the
# default path must never be listed for the installed backend's default.
_PRETRANSPOSED = ("pretransposed_mlps speeds up TransformerLens 3's GatedMLP "
                  "(HookedTransformer); a TransformerBridge runs the Hugging Face MLP")
ONLY_ON: dict[str, dict[str, str]] = {
    "hooked": {
        "test_mlp_layout::test_fast_path_runs_without_transformer_lens_forward": _PRETRANSPOSED,
        "test_mlp_layout::test_identical_outputs_and_hooks": _PRETRANSPOSED,
        "test_mlp_layout::test_restored_on_exception_and_gpt2_untouched": _PRETRANSPOSED,
        "test_mlp_layout::test_falls_back_after_in_place_change_and_with_gradients": _PRETRANSPOSED,
        "test_stress::test_first_format_log_resumes": (
            "the committed first-format log records the HookedTransformer's own fingerprint of factworld, "
            "which a bridge cannot verify (it is refused with that reason: kvmem.core.fingerprint.same_weights)"),
    },
    "bridge": {},
}


def _key(item) -> tuple[str, str]:
    """(module stem, test name without parameters) of a collected test."""
    return Path(str(item.fspath)).stem, getattr(item, "originalname", None) or item.name.split("[")[0]


def _listed(table, module: str, name: str):
    """The entry of `table` (a collection or a dict) for the module or the test, else None."""
    for k in (f"{module}::{name}", module):
        if k in table:
            return table[k] if isinstance(table, dict) else k
    return None


def pytest_collection_modifyitems(config, items):
    other = {"hooked": "bridge", "bridge": "hooked"}[BACKEND]
    for item in items:
        module, name = _key(item)
        if _listed(CORE_TESTS, module, name):
            item.add_marker(pytest.mark.core)
        reason = _listed(ONLY_ON[other], module, name)
        if reason and not _listed(ONLY_ON[BACKEND], module, name):
            label = {"hooked": "HookedTransformer (TransformerLens 3.9)",
                     "bridge": "TransformerBridge (TransformerLens >= 4.3)"}[other]
            item.add_marker(pytest.mark.skip(reason=f"{label} only: {reason}"))

def forbid_network(mp: pytest.MonkeyPatch) -> None:
    """Make any non-local connection (the Hugging Face hub) fail loudly, within `mp`'s context."""
    import socket

    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not host.startswith(("127.", "::1", "localhost", "/")):
            raise OSError(f"test forbids network access (tried {address!r})")
        return real_connect(self, address)

    mp.setattr(socket.socket, "connect", guarded)


# Evaluation data that is not shipped (known facts, CounterFact, PARAREL, corpora): the library's
# data folder ($KVMEM_DATA, `kvmem.datafiles.data_folder`), as for users and the benchmarks, else the
# project's shared data folder beside the checkout (which users do not have).
SHARED_DATA = data_folder(Path(__file__).resolve().parents[1].parent / "shared" / "data", must_exist=False)


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared evaluation data not found at {path}")
    return path


# The tiny models' sizes (HookedTransformerConfig's names).
TINY_SIZES = dict(n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=50257)
TINY_KINDS = ("gpt2", "gated", "postnorm")


def build_tiny(kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               default_prepend_bos: bool = True, **sizes):
    """A tiny random model on the installed backend, eval mode, weights frozen: `kind` "gpt2"
    (LayerNorm, GELU, learned positions), "gated" (Llama-like: RMSNorm, rotary, gated SiLU MLP,
    grouped-query attention) or, on a bridge, "postnorm" (Gemma-3-like). `sizes` override
    `TINY_SIZES`. For a module's own tiny model (another dtype or size) on either backend."""
    if BACKEND == "bridge":
        return _tiny_bridge(kind, seed=seed, dtype=dtype, default_prepend_bos=default_prepend_bos, **sizes)
    if kind not in ("gpt2", "gated"):
        raise ValueError(f"build_tiny({kind!r}) on a HookedTransformer: the post-norm model is _tiny_postnorm")
    return _tiny(kind, seed, dtype=dtype, default_prepend_bos=default_prepend_bos, **sizes)


def _tiny(kind: str, seed: int = 0, *, dtype: torch.dtype = torch.float32, default_prepend_bos: bool = True,
          **sizes):
    if BACKEND == "bridge":
        return _tiny_bridge(kind, seed=seed, dtype=dtype, default_prepend_bos=default_prepend_bos, **sizes)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    common = dict(
        **{**TINY_SIZES, **sizes}, default_prepend_bos=default_prepend_bos, seed=seed, dtype=dtype,
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
    """3-layer random GPT-2-architecture model (HookedTransformer, or a bridge over a Hugging Face
    GPT-2 on TransformerLens 4) with the real GPT-2 tokenizer."""
    return _tiny("gpt2")


@pytest.fixture(scope="session")
def tiny_gated():
    """3-layer random Llama-like model (RMSNorm, rotary, gated MLP, GQA): a HookedTransformer, or
    a bridge over a Hugging Face Llama on TransformerLens 4."""
    return _tiny("gated")


@pytest.fixture(scope="session", params=["gpt2", "gated"])
def tiny_model(request):
    return _tiny(request.param)


def _tiny_postnorm():
    """Gemma-2/3-like: RMSNorm before *and after* attention and MLP (ln2_post, with a random gain)."""
    if BACKEND == "bridge":
        return _tiny_bridge("postnorm", seed=1)
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
    """3-layer random Gemma-2/3-like model (norms before and after attention and MLP): a
    HookedTransformer, or a bridge over a Hugging Face Gemma-3 on TransformerLens 4."""
    return _tiny_postnorm()


# --- tiny bridges (TransformerLens >= 4.3) ------------------------------------------------------------

def _hf_tiny(kind: str, *, seed: int, n_layers: int, d_model: int, n_ctx: int, d_head: int, n_heads: int,
             d_mlp: int, d_vocab: int):
    """A seeded random Hugging Face causal LM of the tiny sizes: GPT-2, Llama (GQA, 2 key/value
    heads) or Gemma-3 (full attention in every layer, post-MLP norm gain drawn like the
    HookedTransformer's ln2_post.w). Weights drawn with HookedTransformer's scale (0.8/sqrt(d_model))
    rather than Hugging Face's 0.02, so the random models are as far from uniform outputs; norms'
    eps 1e-5 as HookedTransformerConfig's (Gemma's own is 1e-6)."""
    import transformers

    shared = dict(vocab_size=d_vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, head_dim=d_head, intermediate_size=d_mlp,
                  max_position_embeddings=n_ctx, initializer_range=0.8 / d_model ** 0.5)
    if kind == "gpt2":
        assert d_head * n_heads == d_model, "GPT-2's head size is d_model / n_heads"
        config = transformers.GPT2Config(
            vocab_size=d_vocab, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp,
            n_positions=n_ctx, activation_function="gelu_new", initializer_range=shared["initializer_range"],
        )
        cls = transformers.GPT2LMHeadModel
    elif kind == "gated":
        config = transformers.LlamaConfig(**shared, num_key_value_heads=max(1, n_heads // 2), hidden_act="silu",
                                          tie_word_embeddings=False, rms_norm_eps=1e-5)
        cls = transformers.LlamaForCausalLM
    elif kind == "postnorm":
        config = transformers.Gemma3TextConfig(
            **shared, num_key_value_heads=n_heads, hidden_activation="gelu_pytorch_tanh",
            layer_types=["full_attention"] * n_layers, sliding_window=n_ctx, rms_norm_eps=1e-5,
            architectures=["Gemma3ForCausalLM"],  # the bridge picks its adapter by this name
        )
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = cls(config)
        if kind == "postnorm":  # Gemma's RMSNorm scales by (1 + weight): gains in [0.5, 1.5)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for layer in hf.model.layers:
                    layer.post_feedforward_layernorm.weight.copy_(torch.rand(d_model, generator=g) - 0.5)
    return hf.eval()


def _tiny_bridge(kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 default_prepend_bos: bool = True, **sizes):
    """A tiny random `TransformerBridge` in compatibility mode, booted offline from `_hf_tiny`'s model
    (no hub), with the GPT-2 tokenizer; eval mode, weights frozen."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = _hf_tiny(kind, seed=seed, **{**TINY_SIZES, **sizes}).to(dtype)
    name = {"gpt2": "gpt2", "gated": "tiny-llama", "postnorm": "tiny-gemma3"}[kind]
    model = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=gpt2_tokenizer(), dtype=dtype)
    model.enable_compatibility_mode()
    model.cfg.default_prepend_bos = default_prepend_bos
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
