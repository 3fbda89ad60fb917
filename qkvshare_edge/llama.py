"""`Llama`: llama_cpp.Llama with CacheCard export and import."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals

from .attention import DEFAULT_WINDOW as DEFAULT_ATTENTION_WINDOW
from .attention import AttentionRecorder
from .card import CacheCard
from .controllers import DEFAULT_CONTROLLER, Controller
from .fingerprint import ModelFingerprint, fingerprint_model
from .handoff import (
    DEFAULT_BUDGET_BITS,
    DEFAULT_DISTORTION,
    DEFAULT_K_BLOCK,
    DEFAULT_K_LAYOUT,
    DEFAULT_K_WEIGHT,
    HandoffTiming,
    export_card,
    import_card,
)
from .models import resolve_model
from .sensitivity import LayerSensitivity

logger = logging.getLogger(__name__)


class Llama(llama_cpp.Llama):
    """A `llama_cpp.Llama` that exports and imports CacheCards.

    Every argument of `llama_cpp.Llama` works as before. Added:

    Args:
        n_seq_max: number of sequences the context holds (default 1).
        kv_unified: one KV buffer shared by all sequences (True), or one per
            sequence (False, each with n_ctx / n_seq_max cells). None keeps
            llama.cpp's default.
        attention_window: recent query rows kept per layer for the
            'attention' controller (see `attention.py`); 0 turns the
            recording off.
    """

    def __init__(
        self,
        model_path: str,
        *,
        n_seq_max: int = 1,
        kv_unified: bool | None = None,
        attention_window: int = DEFAULT_ATTENTION_WINDOW,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_path, **kwargs)
        # Computed now (about 0.25 s for Gemma 3 270M, then cached per file)
        # so that no handoff pays for it.
        self._fingerprint = fingerprint_model(model_path)
        # The card each sequence was last imported from, and the first position
        # decoded again since then, for hop-stable re-export.
        self._imported_cards: dict[int, CacheCard] = {}
        self._clean_until: dict[int, int] = {}
        self.last_export_timing: HandoffTiming | None = None
        self.last_import_timing: HandoffTiming | None = None
        if attention_window < 0:
            raise ValueError(f"attention_window must be >= 0 (0 turns recording off), got {attention_window}")
        self.attention_recorder: AttentionRecorder | None = None
        if attention_window > 0:
            self.attention_recorder = self._make_recorder(attention_window)
            self.attention_recorder.attach(self.context_params)
        if n_seq_max != 1 or kv_unified is not None or self.attention_recorder is not None:
            self._recreate_context(n_seq_max, kv_unified)
        self._scope_cache_removal_to_seq_0()

    @classmethod
    def from_model(cls, name_or_path: str, **kwargs: Any) -> Llama:
        """Load a model by registry name (e.g. 'gemma3-270m') or .gguf path."""
        return cls(str(resolve_model(name_or_path)), **kwargs)

    def _make_recorder(self, window: int) -> AttentionRecorder:
        model = self._model.model
        n_head = max(1, int(llama_cpp.llama_model_n_head(model)))
        n_head_kv = max(1, int(llama_cpp.llama_model_n_head_kv(model)))
        n_embd = int(llama_cpp.llama_model_n_embd(model))
        head_k = self._fingerprint.hparam_int("attention.key_length", n_embd // n_head)
        n_layer = int(llama_cpp.llama_model_n_layer(model))
        return AttentionRecorder(n_layer, n_head * head_k, n_head_kv * head_k, window)

    def _recreate_context(self, n_seq_max: int, kv_unified: bool | None) -> None:
        # llama_cpp.Llama builds its context before a subclass can set these
        # fields, so the context is made again with them.
        if n_seq_max < 1:
            raise ValueError(f"n_seq_max must be at least 1, got {n_seq_max}")
        self.context_params.n_seq_max = n_seq_max
        if kv_unified is not None:
            self.context_params.kv_unified = kv_unified
        old = self._ctx
        self._ctx = self._stack.enter_context(
            contextlib.closing(
                _internals.LlamaContext(model=self._model, params=self.context_params, verbose=self.verbose)
            )
        )
        old.close()
        self.n_tokens = 0

    def _scope_cache_removal_to_seq_0(self) -> None:
        # llama_cpp.Llama's eval and generate manage seq_id 0 only, but remove
        # cells with seq_id -1 (every sequence), which would cut the other
        # sequences of a multi-sequence context. Here -1 means seq_id 0.
        remove = self._ctx.kv_cache_seq_rm

        def remove_from_seq_0(seq_id: int, p0: int, p1: int) -> bool:
            return remove(0 if seq_id == -1 else seq_id, p0, p1)

        self._ctx.kv_cache_seq_rm = remove_from_seq_0  # type: ignore[method-assign]

    @property
    def fingerprint(self) -> ModelFingerprint:
        """The model's fingerprint, which cards record and imports check."""
        return self._fingerprint

    @property
    def cached_tokens(self) -> list[int]:
        """Token ids of seq_id 0 that are in the KV cache, in position order."""
        return self.input_ids[: self.n_tokens].tolist()

    def export_card(
        self,
        *,
        budget: float = DEFAULT_BUDGET_BITS,
        controller: str | Controller = DEFAULT_CONTROLLER,
        seq_id: int = 0,
        tokens: Sequence[int] | np.ndarray | None = None,
        group_size: int | None = None,
        k_weight: float = DEFAULT_K_WEIGHT,
        k_layout: str = DEFAULT_K_LAYOUT,
        k_block: int = DEFAULT_K_BLOCK,
        distortion: str = DEFAULT_DISTORTION,
        sensitivity: LayerSensitivity | str | None = "auto",
        hop: int | None = None,
        parent_sha256: str | None = None,
        reuse_imported: bool = True,
        n_threads: int = 0,
    ) -> CacheCard:
        """Export one sequence's KV cache as a CacheCard.

        Args:
            budget: average bits per K/V element, counting scales, minimums
                and width tags; 16 stores every row as f16 (lossless for f16
                caches). The smallest budget is 2.28 bits with groups of 128
                on rows of 256 elements (BudgetError names it otherwise).
            controller: importance controller name ('attention', 'uniform',
                'sink-recent', 'key-norm'), or any callable that maps a
                `LayerView` to per-row key and value scores.
            seq_id: the sequence to export.
            tokens: token ids by position; defaults to this wrapper's tokens
                for seq_id 0 and is required for other sequences.
            group_size: elements per quantization group, a multiple of 8 dividing every
                row; None picks 128, or the largest power of two dividing every row.
            k_weight: importance of key rows relative to value rows, when no
                sensitivity table applies.
            k_layout: 'channel' (default) stores quantized keys with one range per
                channel within blocks of `k_block` positions; 'row' stores them
                like values (card format version 1, readable by qkvshare_edge 0.1).
                Lossless cards (budget 16) always use 'row'.
            k_block: positions per key block of the channel layout.
            distortion: how the allocator values a width for a row: 'model'
                (the same for every row) or 'measured' (each row is encoded
                at every width and its own error counts).
            sensitivity: per-layer weights (see `sensitivity.py`): 'auto' uses
                the table shipped for this model if there is one, a path or a
                `LayerSensitivity` uses that table, None weighs every layer alike.
            hop: how many handoffs this card has made; default: 1, or one more
                than the card this sequence was imported from.
            parent_sha256: SHA-256 of the parent card; default: the imported card's, if any.
            reuse_imported: keep the imported card's codes for tokens that are
                unchanged since the import, so error does not compound over hops.
            n_threads: native worker threads, 0 for one per core.

        Raises:
            ValueError: on an empty sequence, an unknown controller, missing
                token ids, or a budget below the minimum (BudgetError).
            StateFormatError: when llama.cpp's state does not have the expected layout.
        """
        card, timing = export_card(
            self,
            budget=budget,
            controller=controller,
            seq_id=seq_id,
            tokens=tokens,
            group_size=group_size,
            k_weight=k_weight,
            k_layout=k_layout,
            k_block=k_block,
            distortion=distortion,
            sensitivity=sensitivity,
            hop=hop,
            parent_sha256=parent_sha256,
            previous=self._imported_cards.get(seq_id) if reuse_imported else None,
            previous_valid_until=self._clean_until.get(seq_id, 0),
            n_threads=n_threads,
        )
        self.last_export_timing = timing
        return card

    def import_card(self, card: CacheCard, *, seq_id: int = 0, replace: bool = False, n_threads: int = 0) -> None:
        """Load a card into one sequence, so decoding continues without re-prefill.

        For seq_id 0 the wrapper's token list becomes the card's tokens, so
        `create_completion(self.cached_tokens + more)` and `continue_completion`
        reuse the imported cache as a prefix.

        Args:
            card: the card to import.
            seq_id: the target sequence.
            replace: overwrite the sequence if it already holds tokens.
            n_threads: native worker threads, 0 for one per core.

        Raises:
            ModelMismatchError: the card was made by another model or RoPE setting.
            ContextTooSmallError: the context has no room for the card's tokens.
            SequenceNotEmptyError: the sequence holds tokens and replace is False.
            ImportFailedError: llama.cpp rejected the state; the sequence was restored.
        """
        self.last_import_timing = import_card(self, card, seq_id=seq_id, replace=replace, n_threads=n_threads)
        self._imported_cards[seq_id] = card
        self._clean_until[seq_id] = int(card.positions[-1]) + 1

    def clear_cache(self) -> None:
        """Remove every sequence's cells from the KV cache, and forget imported cards and recorded queries."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.n_tokens = 0
        self._imported_cards.clear()
        self._clean_until.clear()
        if self.attention_recorder is not None:
            self.attention_recorder.reset()

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens into seq_id 0 after `n_tokens` (llama_cpp.Llama.eval)."""
        # Cells from n_tokens on are decoded again, so an imported card's codes
        # no longer describe them.
        if 0 in self._clean_until:
            self._clean_until[0] = min(self._clean_until[0], self.n_tokens)
        if self.attention_recorder is not None:
            self.attention_recorder.record_batch(0, self.n_tokens, len(tokens))
        super().eval(tokens)

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Any:
        """Generate tokens (llama_cpp.Llama.generate), re-decoding the whole prompt where a window cache needs it.

        llama-cpp-python keeps the longest cached prefix and decodes the rest.
        A sliding-window cache restored from a card or a state holds only the
        last window of cells, so a prompt that departs from the cached tokens
        before that window's reach would attend to cells that are not there.
        The prompt is then decoded from the start instead.
        """
        # reset is the 7th parameter after tokens in llama_cpp.Llama.generate.
        reset = kwargs.get("reset", args[6] if len(args) > 6 else True)
        if reset and self.n_tokens > 0:
            self._drop_cache_if_window_missing(list(tokens))
        return super().generate(tokens, *args, **kwargs)

    def _drop_cache_if_window_missing(self, tokens: list[int]) -> None:
        n_swa = int(llama_cpp.llama_model_n_swa(self._model.model))
        if n_swa <= 0:
            return
        prefix = 0
        for cached, new in zip(self.input_ids[: self.n_tokens].tolist(), tokens, strict=False):
            if cached != new:
                break
            prefix += 1
        # generate() decodes again from `keep`: the prefix, or one token less when it covers the prompt.
        keep = prefix - 1 if prefix == len(tokens) else prefix
        if keep >= self.n_tokens:
            return
        memory = llama_cpp.llama_get_memory(self.ctx)
        pos_min = int(llama_cpp.llama_memory_seq_pos_min(memory, 0))
        # A query at position `keep` sees cells from keep - n_swa + 1 on (llama.cpp's standard window).
        if pos_min > max(0, keep - n_swa + 1):
            logger.debug(
                "prompt departs at %d before the window cache's first cell %d; decoding it again", keep, pos_min
            )
            llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
            self.n_tokens = 0

    def continue_completion(self, text: str, **kwargs: Any) -> Any:
        """Complete `text` appended to the cached tokens of seq_id 0 (no BOS is added).

        Takes the keyword arguments of `create_completion`.
        """
        follow_up = self.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return self.create_completion(self.cached_tokens + follow_up, **kwargs)

    def eval_sequence(self, tokens: Sequence[int], seq_id: int) -> None:
        """Decode tokens into any sequence, after the positions it already holds.

        seq_id 0 goes through `eval`, which keeps the wrapper's token list.
        The logits of the last token are then available from `last_logits()`.
        """
        if seq_id == 0:
            self.eval(tokens)
            return
        memory = llama_cpp.llama_get_memory(self.ctx)
        n_past = int(llama_cpp.llama_memory_seq_pos_max(memory, seq_id)) + 1
        if seq_id in self._clean_until:
            self._clean_until[seq_id] = min(self._clean_until[seq_id], n_past)
        if self.attention_recorder is not None:
            self.attention_recorder.record_batch(seq_id, n_past, len(tokens))
        batch = self._batch.batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = n_past + start + i
                batch.seq_id[i][0] = seq_id
                batch.n_seq_id[i] = 1
                batch.logits[i] = i == len(chunk) - 1
            self._ctx.decode(self._batch)

    def last_logits(self) -> np.ndarray:
        """Return a copy of the logits of the last decoded token, shape (n_vocab,)."""
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab(),)).copy()
