"""Shared fixtures: tiny GGUF models, a fixed token list and a factory of contexts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from qkvshare_edge import Llama
from qkvshare_edge.models import write_tiny_gemma3, write_tiny_llama

# ggml type ids of the KV cache types used by the tests.
F32 = 0
F16 = 1
Q4_0 = 2
Q8_0 = 8
BF16 = 30

# Smallest context that the llama.cpp of llama-cpp-python 0.3.36 creates: it rounds n_ctx up
# to a multiple of 256.
N_CTX = 256

PARAGRAPH = (
    "Every morning the ferry leaves the harbor at seven, carrying mail, bread and a few sleepy "
    "workers to the island. The captain checks the weather, counts the passengers and writes "
    "both numbers in a small notebook that he keeps in his coat. "
)

LlamaFactory = Callable[..., Llama]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_path(model_dir: Path) -> Path:
    """Tiny llama: 2 layers, GQA with 2 KV heads of 64, vocabulary of 625."""
    return write_tiny_llama(model_dir / "tiny-llama-seed0.gguf", seed=0)


@pytest.fixture(scope="session")
def llama_seed1_path(model_dir: Path) -> Path:
    """Tiny llama with other weights but the same shapes and vocabulary as `llama_path`."""
    return write_tiny_llama(model_dir / "tiny-llama-seed1.gguf", seed=1)


@pytest.fixture(scope="session")
def gemma3_path(model_dir: Path) -> Path:
    """Tiny gemma3: 6 layers, layers 0-4 with a sliding window of 32 tokens, layer 5 full."""
    return write_tiny_gemma3(model_dir / "tiny-gemma3-seed0.gguf", seed=0, sliding_window=32)


@pytest.fixture(scope="session")
def model_paths(llama_path: Path, gemma3_path: Path) -> dict[str, Path]:
    """Paths of the tiny models by short name, for tests parametrized over models."""
    return {"llama": llama_path, "gemma3": gemma3_path}


@pytest.fixture(scope="session")
def text_tokens(llama_path: Path) -> list[int]:
    """At least 320 token ids of a repeated English paragraph, starting with BOS.

    Both tiny models share one vocabulary, so the ids fit either model.
    """
    vocab = llama_cpp.Llama(model_path=str(llama_path), vocab_only=True, verbose=False)
    try:
        tokens = vocab.tokenize((PARAGRAPH * 8).encode("utf-8"), add_bos=True)
    finally:
        vocab.close()
    assert len(tokens) >= 320, f"the paragraph gives only {len(tokens)} tokens"
    return tokens


@pytest.fixture
def new_llama() -> Iterator[LlamaFactory]:
    """Yield a factory of `Llama` contexts with small test defaults, and close them at teardown.

    The factory takes the model path and any `Llama` keyword argument. Its defaults are
    n_ctx=256, flash_attn=True, f16 K and V caches, 2 threads and no logging.
    """
    created: list[Llama] = []

    def make(path: Path, **kwargs: Any) -> Llama:
        options: dict[str, Any] = {
            "n_ctx": N_CTX,
            "flash_attn": True,
            "type_k": F16,
            "type_v": F16,
            "n_threads": 2,
            "n_threads_batch": 2,
            "verbose": False,
        }
        options.update(kwargs)
        llm = Llama(str(path), **options)
        created.append(llm)
        return llm

    yield make
    for llm in created:
        llm.close()
