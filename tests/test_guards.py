"""Faults from hostile or mismatched input: each gets a clear error and leaves the receiver as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

import qkvshare_edge
from qkvshare_edge import (
    CacheCard,
    CardSignatureError,
    ContextTooSmallError,
    ImportFailedError,
    Llama,
    ModelMismatchError,
    state,
)
from qkvshare_edge.fingerprint import fingerprint_model
from qkvshare_edge.signing import load_key

KEY = b"a-shared-key-of-32-bytes-0123456"


def pos_max(llm: Llama, seq_id: int) -> int:
    return int(llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm.ctx), seq_id))


def probe_logits(llm: Llama, seq_id: int, token: int) -> np.ndarray:
    """Logits after decoding one token into `seq_id`, without keeping it (copy the state first)."""
    saved = state.read_seq_state(llm.ctx, seq_id)
    if seq_id == 0:
        n_tokens = llm.n_tokens
        llm.eval([token])
        llm.n_tokens = n_tokens
    else:
        llm.eval_sequence([token], seq_id)
    logits = llm.last_logits()
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), seq_id, -1, -1)
    assert state.write_seq_state(llm.ctx, seq_id, saved)
    return logits


# -- sliding window across two handoffs ----------------------------------------------


def test_window_two_handoffs_exact(new_llama, gemma3_path, text_tokens) -> None:
    """A -> B -> C with budget-16 cards equals the same chain through llama.cpp's own state."""
    first, second, probe = text_tokens[:100], text_tokens[100:160], text_tokens[160:163]

    def chain(use_cards: bool) -> np.ndarray:
        a = new_llama(gemma3_path, flash_attn=False)
        a.eval(first)
        b = new_llama(gemma3_path, flash_attn=False)
        if use_cards:
            b.import_card(a.export_card(budget=16))
        else:
            assert state.write_seq_state(b.ctx, 0, state.read_seq_state(a.ctx, 0))
            b.input_ids[: len(first)] = first
            b.n_tokens = len(first)
        b.eval(second)  # 60 more tokens: past the window of 32 after the handoff
        c = new_llama(gemma3_path, flash_attn=False)
        if use_cards:
            card = b.export_card(budget=16, hop=2)
            assert card.provenance.hop == 2
            assert card.n_tokens == 160
            assert card.sections[1].n_cells == 32
            c.import_card(card)
        else:
            assert state.write_seq_state(c.ctx, 0, state.read_seq_state(b.ctx, 0))
            c.input_ids[:160] = first + second
            c.n_tokens = 160
        c.eval(probe)
        assert pos_max(c, 0) == 162
        return c.last_logits()

    expected = chain(use_cards=False)
    got = chain(use_cards=True)
    diff = float(np.abs(got - expected).max())
    assert diff == 0.0, f"two-hop chain through cards differs from llama.cpp's state chain by {diff}"


# -- room in a shared cache ----------------------------------------------------------


def test_shared_cache_full_rejected(new_llama, llama_path, text_tokens) -> None:
    sender = new_llama(llama_path)
    sender.eval(text_tokens[:100])
    card = sender.export_card(budget=4)

    receiver = new_llama(llama_path, n_ctx=256, n_seq_max=2, kv_unified=True)
    receiver.eval_sequence(text_tokens[:200], 1)
    before = probe_logits(receiver, 1, text_tokens[200])
    with pytest.raises(ContextTooSmallError, match="56 free"):
        receiver.import_card(card, seq_id=0)
    assert pos_max(receiver, 0) == -1
    after = probe_logits(receiver, 1, text_tokens[200])
    assert np.array_equal(before, after)


# -- a failure inside llama.cpp is rolled back ----------------------------------------


def test_failed_write_rolled_back(new_llama, gemma3_path, text_tokens, monkeypatch) -> None:
    """llama.cpp accepts the first cache section and rejects the second: the sequence comes back."""
    sender = new_llama(gemma3_path)
    sender.eval(text_tokens[:80])
    card = sender.export_card(budget=4)

    receiver = new_llama(gemma3_path, n_seq_max=2)
    receiver.eval(text_tokens[100:150])
    receiver.eval_sequence(text_tokens[150:190], 1)
    before_0 = probe_logits(receiver, 0, text_tokens[3])
    before_1 = probe_logits(receiver, 1, text_tokens[3])

    real_build = state.build_seq_state

    def build_with_bad_window_section(sections, seq_id, layout, n_threads=0):
        blob = bytearray(real_build(sections, seq_id, layout, n_threads))
        # Corrupt the last layer's V type of the last section: llama.cpp has
        # already written the full-attention section when it reads this.
        window = real_build(sections[1:], seq_id, layout, n_threads)
        start = len(blob) - (len(window) - 8)
        v_type_at = blob.rfind((1).to_bytes(4, "little"), start, len(blob) - 32 * 64 * 2)
        blob[v_type_at : v_type_at + 4] = (0).to_bytes(4, "little")
        return bytes(blob)

    monkeypatch.setattr(state, "build_seq_state", build_with_bad_window_section)
    with pytest.raises(ImportFailedError, match="restored"):
        receiver.import_card(card, seq_id=0, replace=True)
    monkeypatch.undo()

    assert pos_max(receiver, 0) == 49
    assert np.array_equal(probe_logits(receiver, 0, text_tokens[3]), before_0)
    assert np.array_equal(probe_logits(receiver, 1, text_tokens[3]), before_1)


# -- fingerprint ----------------------------------------------------------------------


def test_tokenizer_change_changes_fingerprint(llama_path, tmp_path: Path) -> None:
    data = llama_path.read_bytes()
    marker = b"<0x41>"
    assert data.count(marker) == 1
    changed = tmp_path / "other-tokenizer.gguf"
    changed.write_bytes(data.replace(marker, b"<0x5A>"))
    original, other = fingerprint_model(llama_path), fingerprint_model(changed)
    assert original.weights_sha256 == other.weights_sha256
    diffs = original.differences(other)
    assert len(diffs) == 1
    assert diffs[0].startswith("tokenizer sha256")


def test_tokenizer_mismatch_rejected(new_llama, llama_path, text_tokens) -> None:
    from dataclasses import replace

    sender = new_llama(llama_path)
    sender.eval(text_tokens[:20])
    card = sender.export_card(budget=8)
    card.model = replace(card.model, tokenizer_sha256="0" * 64)
    receiver = new_llama(llama_path)
    with pytest.raises(ModelMismatchError, match="tokenizer"):
        receiver.import_card(card)
    assert pos_max(receiver, 0) == -1


# -- signatures -----------------------------------------------------------------------


def test_signature_round_trip(new_llama, llama_path, text_tokens, tmp_path: Path) -> None:
    sender = new_llama(llama_path)
    sender.eval(text_tokens[:20])
    path = sender.export_card(budget=4).save(tmp_path / "signed.qkvc", key=KEY, key_id="peers")
    assert CacheCard.load(path).signature_status == "signed"
    assert CacheCard.load(path, key=KEY, require_signature=True).signature_status == "verified"


def test_signature_wrong_key_rejected(new_llama, llama_path, text_tokens, tmp_path: Path) -> None:
    sender = new_llama(llama_path)
    sender.eval(text_tokens[:20])
    path = sender.export_card(budget=4).save(tmp_path / "signed.qkvc", key=KEY, key_id="peers")
    with pytest.raises(CardSignatureError, match="does not verify"):
        CacheCard.load(path, key=b"another-key-of-enough-length")


def test_unsigned_rejected_when_required(new_llama, llama_path, text_tokens, tmp_path: Path) -> None:
    sender = new_llama(llama_path)
    sender.eval(text_tokens[:20])
    path = sender.export_card(budget=4).save(tmp_path / "plain.qkvc")
    with pytest.raises(CardSignatureError, match="not signed"):
        CacheCard.load(path, key=KEY, require_signature=True)


def test_key_sources(tmp_path: Path, monkeypatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    assert load_key(key_file) == KEY
    monkeypatch.setenv("QKVEDGE_CARD_KEY", "env-key-0123456789")
    assert load_key() == b"env-key-0123456789"
    monkeypatch.setenv("QKVEDGE_CARD_KEY", "short")
    with pytest.raises(ValueError, match="at least 16"):
        load_key()


def test_oversized_card_rejected(new_llama, llama_path, text_tokens, tmp_path: Path) -> None:
    from qkvshare_edge import CardFormatError

    sender = new_llama(llama_path)
    sender.eval(text_tokens[:20])
    path = sender.export_card(budget=4).save(tmp_path / "card.qkvc")
    with pytest.raises(CardFormatError, match="more than the limit"):
        CacheCard.load(path, max_bytes=1024)


# -- atomic write under a killed process ----------------------------------------------


def child_env() -> dict[str, str]:
    """Environment for a child process that imports the same qkvshare_edge as this test run."""
    env = dict(os.environ)
    root = str(Path(qkvshare_edge.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


WRITER = """
import sys, numpy as np
from qkvshare_edge import CacheCard
card = CacheCard.load(sys.argv[1])
print("ready", flush=True)
while True:
    card.save(sys.argv[2])
"""


def test_killed_writer_leaves_whole_card(new_llama, llama_path, text_tokens, tmp_path: Path) -> None:
    sender = new_llama(llama_path, n_ctx=512)
    sender.eval(text_tokens[:300])
    source = sender.export_card(budget=16).save(tmp_path / "source.qkvc")
    target = tmp_path / "target.qkvc"
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(source), str(target)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=child_env(),
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if target.exists():
            CacheCard.load(target)  # a whole card, never a partial one
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # A killed writer can leave its temporary file behind, but never under the final name.
    assert all(name.startswith(".target.qkvc.") for name in leftovers)


def test_seq_0_eval_keeps_other_sequences(new_llama, llama_path, text_tokens) -> None:
    """llama-cpp-python's eval removes cells of every sequence; the wrapper limits that to seq_id 0."""
    llm = new_llama(llama_path, n_ctx=1024, n_seq_max=4, kv_unified=False)
    llm.eval_sequence(text_tokens[:80], 1)
    llm.eval(text_tokens[:5])
    assert pos_max(llm, 1) == 79
    llm.reset()
    llm.eval(text_tokens[:3])
    assert pos_max(llm, 1) == 79
    assert pos_max(llm, 0) == 2
