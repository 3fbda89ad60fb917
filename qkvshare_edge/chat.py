"""Chat sessions on a llama.cpp sequence, agents that hold them, and handoffs between agents.

A `ChatSession` keeps one conversation in one sequence of a `Llama` context.
It appends each message as tokens after the ones already cached, so a turn
only decodes its new tokens, and generates the reply with its own sampling
loop on `eval_sequence` and `last_logits`. That loop works on any sequence,
which lets `server.py` run one session per sequence of a shared context.

The prompt format comes from the model's chat template (GGUF key
`tokenizer.chat_template`, rendered by llama-cpp-python's
`Jinja2ChatFormatter`) when the model has one, and is a plain
"User: ... / Assistant:" role format otherwise (Gemma 3 270M base, the
default model, has no template).

A handoff exports the sender's sequence as a CacheCard, serializes it, and
imports it into the receiver, which continues the conversation without
re-prefill. The receiver is a `LocalAgent` (a context in this process) or a
`RemoteAgent` (a session of a `qkvedge serve`, reached over HTTP).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import llama_cpp
import numpy as np

from .agents import DEFAULT_AGENT_BUDGET_BITS, AgentConfig, AgentsFile, is_url
from .card import CacheCard
from .controllers import DEFAULT_CONTROLLER
from .errors import ContextTooSmallError, QKVShareError

if TYPE_CHECKING:
    from .llama import Llama
    from .server import AgentClient

from .signing import load_key

logger = logging.getLogger(__name__)

# Tokens decoded per llama_decode call while prefilling; the progress bar moves once per chunk.
PREFILL_CHUNK = 256
# Prefills longer than this show a progress bar (on a terminal).
PROGRESS_MIN_TOKENS = 2 * PREFILL_CHUNK

# A text piece with a flag: True when special-token text in it (such as "<start_of_turn>") is parsed as
# special tokens. Template scaffolding is parsed, while message content is not, so a user cannot type control tokens.
Segment = tuple[str, bool]

ProgressCallback = Callable[[int, int], None]
TextCallback = Callable[[str], None]


class ContextFullError(ContextTooSmallError):
    """The session's context has no room for the next message or reply."""


# -- prompt format --------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    """The text pieces around user messages and replies that write a conversation as a prompt.

    A conversation reads `head + user + assistant_prompt + reply + user_separator + user + assistant_prompt + ...`.
    A loaded file either opens a user message that the next message joins, or
    is plain context text between turns (`document_in_turn`).
    """

    name: str
    # Text before the first user message when there is no system prompt.
    head: str
    # Text before and after the system prompt, ending where the first user message starts; None when the
    # format has no place for it, in which case the system prompt opens the first user message.
    system_head: tuple[str, str] | None
    # Text that ends the previous turn (a reply or a user message) and opens a new user message.
    user_separator: str
    # Text that ends a user message and opens the assistant's reply.
    assistant_prompt: str
    # Strings that end a reply besides the model's end-of-generation tokens.
    stop: tuple[str, ...] = ()
    # The template writes the BOS token's text itself; the session then adds the BOS token id.
    bos_in_template: bool = False
    # A loaded file opens (or joins) a user message; when False it is context text outside any turn.
    document_in_turn: bool = True
    # Text that opens a user message after a file outside any turn; None means `user_separator`, which also
    # follows a card's tokens, whose last turn is unknown.
    context_separator: str | None = None

    def head_segments(self, system: str) -> tuple[list[Segment], str]:
        """Return the segments that open a conversation, and the text to put before the first message's content."""
        if not system:
            return [(self.head, True)], ""
        if self.system_head is None:
            return [(self.head, True)], system + "\n\n"
        before, after = self.system_head
        return [(before, True), (system, False), (after, True)], ""


# The format for models without a chat template. Its roles are named Question and Answer, because base
# models continue that pattern more reliably than User/Assistant. On Gemma 3 270M base (Q4_K_M, greedy,
# three questions about the demo text after the text) it answered two of three correctly and stopped at
# the next "Question:", where User/Assistant answered one and ran on with invented roles.
PLAIN_FORMAT = ChatFormat(
    name="plain",
    head="Question: ",
    system_head=("", "\n\nQuestion: "),
    user_separator="\nQuestion: ",
    assistant_prompt="\nAnswer:",
    stop=("\nQuestion:",),
    document_in_turn=False,
    context_separator="\n\nQuestion: ",
)

_SENTINELS = ("QKVSYSTEMSENTINEL", "QKVUSERSENTINELONE", "QKVASSISTANTSENTINEL", "QKVUSERSENTINELTWO")


def format_from_template(template: str, bos_text: str, eos_text: str) -> ChatFormat:
    """Derive a `ChatFormat` from a Jinja chat template by rendering a probe conversation.

    Raises:
        ValueError: the template fails to render, or does not write message contents verbatim and in order.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    try:
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text)
    except Exception as exc:  # jinja2 raises its own TemplateSyntaxError and others
        raise ValueError(f"the chat template is not valid Jinja: {exc}") from exc
    system, user1, assistant, user2 = _SENTINELS
    conversation = [
        {"role": "user", "content": user1},
        {"role": "assistant", "content": assistant},
        {"role": "user", "content": user2},
    ]
    try:
        text = formatter(messages=conversation).prompt  # type: ignore[arg-type]
    except Exception as exc:  # a template is arbitrary code and may raise anything
        raise ValueError(f"the chat template failed to render a user/assistant/user conversation: {exc}") from exc
    pieces = _split_on(text, [user1, assistant, user2])
    if pieces is None:
        raise ValueError("the chat template does not write message contents verbatim and in order")
    head, between, separator, prompt = pieces
    bos_in_template = bool(bos_text) and head.startswith(bos_text)
    if bos_in_template:
        head = head[len(bos_text) :]

    system_head: tuple[str, str] | None = None
    try:
        with_system = formatter(messages=[{"role": "system", "content": system}, *conversation]).prompt  # type: ignore[arg-type]
    except Exception as exc:  # templates commonly raise on a role they do not support
        logger.debug("the chat template does not take a system message (%s); it opens the first user message", exc)
    else:
        split = _split_on(with_system, [system, user1])
        if split is not None and split[2].startswith(between):
            before, after = split[0], split[1]
            if bos_in_template and before.startswith(bos_text):
                before = before[len(bos_text) :]
            system_head = (before, after)
    return ChatFormat(
        name="template",
        head=head,
        system_head=system_head,
        user_separator=separator,
        assistant_prompt=prompt or between,
        bos_in_template=bos_in_template,
    )


def _split_on(text: str, markers: Sequence[str]) -> list[str] | None:
    """Split `text` at each marker in order; None when a marker is missing."""
    pieces, start = [], 0
    for marker in markers:
        index = text.find(marker, start)
        if index < 0:
            return None
        pieces.append(text[start:index])
        start = index + len(marker)
    pieces.append(text[start:])
    return pieces


def chat_format_for(llm: Llama) -> ChatFormat:
    """Return the chat format of `llm`'s model: its GGUF chat template when usable, else the plain role format."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return PLAIN_FORMAT
    bos_text = (
        llm.detokenize([llm.token_bos()], special=True).decode("utf-8", errors="replace")
        if llm.token_bos() >= 0
        else ""
    )
    eos_text = (
        llm.detokenize([llm.token_eos()], special=True).decode("utf-8", errors="replace")
        if llm.token_eos() >= 0
        else ""
    )
    try:
        return format_from_template(template, bos_text, eos_text)
    except ValueError as exc:
        logger.warning(
            "%s: cannot use the model's chat template (%s); using the plain role format", llm.model_path, exc
        )
        return PLAIN_FORMAT


# -- sampling -------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """Token sampling: greedy at temperature 0, else temperature with top-k and top-p."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int = 0

    @classmethod
    def from_agent(cls, agent: AgentConfig) -> SamplingSettings:
        return cls(agent.temperature, agent.top_k, agent.top_p, agent.repeat_penalty, seed=agent.seed)


def sample_token(
    logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator, recent: Sequence[int] = ()
) -> int:
    """Pick the next token id from one row of logits.

    The repeat penalty divides positive logits (and multiplies negative ones)
    of the tokens in `recent`, as llama.cpp's penalty sampler does.
    """
    scores = logits.astype(np.float64, copy=True)
    if settings.repeat_penalty != 1.0 and len(recent):
        seen = np.unique(np.asarray(recent[-settings.repeat_last_n :], dtype=np.int64))
        seen = seen[(seen >= 0) & (seen < scores.shape[0])]
        values = scores[seen]
        scores[seen] = np.where(values > 0, values / settings.repeat_penalty, values * settings.repeat_penalty)
    if settings.temperature <= 0:
        return int(np.argmax(scores))

    candidates = np.arange(scores.shape[0])
    if 0 < settings.top_k < scores.shape[0]:
        candidates = np.argpartition(-scores, settings.top_k - 1)[: settings.top_k]
    chosen = scores[candidates] / settings.temperature
    order = np.argsort(-chosen)
    candidates, chosen = candidates[order], chosen[order]
    probabilities = np.exp(chosen - chosen[0])
    probabilities /= probabilities.sum()
    if settings.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probabilities), settings.top_p)) + 1
        candidates, probabilities = candidates[:keep], probabilities[:keep] / probabilities[:keep].sum()
    return int(rng.choice(candidates, p=probabilities))


class _StopScanner:
    """Pass generated text through, holding back any tail that could start a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.emitted = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return the part that is safe to show, and whether a stop string appeared."""
        self.pending += text
        for stop in self.stops:
            index = self.pending.find(stop)
            if index >= 0:
                out = self.pending[:index]
                self.pending = ""
                self.emitted += out
                return out, True
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:length]):
                    hold = max(hold, length)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        self.emitted += out
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.emitted += out
        return out


# -- session --------------------------------------------------------------------


@dataclass
class Reply:
    """One generated reply and its timings."""

    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end of turn), "length" (max_tokens or context), "interrupted"
    prompt_tokens: int  # tokens of the request decoded before the reply
    cached_tokens: int  # context tokens reused from the KV cache
    ttft_ms: float  # from the request to the first generated token
    total_ms: float

    @property
    def tokens_per_second(self) -> float:
        seconds = (self.total_ms - self.ttft_ms) / 1e3
        return (self.n_tokens - 1) / seconds if self.n_tokens > 1 and seconds > 0 else 0.0


class ChatSession:
    """One conversation in one sequence of a `Llama` context.

    `tokens` lists every token of the conversation; the first `n_cached` of
    them are in the sequence's KV cache, and the rest are decoded before the
    next reply. Every llama.cpp call runs under `model_lock`, so sessions on
    other sequences of the same context can run in other threads.

    NOTE: seq_id 0 goes through llama-cpp-python's `eval`, which removes the
    cells after its token count from every sequence, so a context shared by
    several sessions must leave seq_id 0 unused.
    """

    def __init__(
        self,
        llm: Llama,
        chat_format: ChatFormat,
        sampling: SamplingSettings,
        *,
        seq_id: int = 0,
        system: str = "",
        model_lock: threading.Lock | None = None,
    ) -> None:
        self.llm = llm
        self.format = chat_format
        self.sampling = sampling
        self.seq_id = seq_id
        self.system = system
        self.model_lock = model_lock or threading.Lock()
        self.tokens: list[int] = []
        self.n_cached = 0
        # "empty", "user_open" (a user message waits for more), "context" (a file outside any turn ended the
        # text), "assistant" (a reply ended the text), or "opaque" (imported from a card whose last turn is unknown).
        self.state = "empty"
        # Text put before the content of the next user message (a system prompt after a handoff).
        self.preamble = ""
        self.turns = 0
        self.source_card: CacheCard | None = None
        self.last_reply: Reply | None = None
        self._rng = np.random.default_rng(sampling.seed)
        self.n_ctx = int(llama_cpp.llama_n_ctx_seq(llm.ctx))

    # -- text to tokens

    def _tokenize(self, segments: Sequence[Segment]) -> list[int]:
        """Tokenize the segments of one addition, adding BOS at the start of the conversation.

        Adjacent segments with the same flag go through one tokenizer call, and
        plain-format text through a single call, because SentencePiece
        tokenizers with a space prefix put a space at the start of every call.
        """
        groups: list[Segment] = []
        for text, special in segments:
            if self.format.name == "plain":
                special = False
            if groups and groups[-1][1] == special:
                groups[-1] = (groups[-1][0] + text, special)
            elif text:
                groups.append((text, special))
        out: list[int] = []
        for text, special in groups:
            first = not self.tokens and not out
            if first and self.format.bos_in_template:
                out.append(self.llm.token_bos())
            add_bos = first and not self.format.bos_in_template
            out += self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
        return out

    def _message_segments(self, content: str) -> list[Segment]:
        """Segments that put `content` into a user message after the current text."""
        prefix = self.preamble
        if self.state == "empty":
            segments, system_prefix = self.format.head_segments(self.system)
            prefix = system_prefix + prefix
        elif self.state == "user_open":
            segments = [("\n\n", False)]
        elif self.state == "context" and self.format.context_separator is not None:
            segments = [(self.format.context_separator, True)]
        else:
            segments = [(self.format.user_separator, True)]
        segments.append((prefix + content, False))
        return segments

    def _append(self, tokens: list[int], what: str) -> None:
        room = self.n_ctx - len(self.tokens)
        if len(tokens) >= room:
            raise ContextFullError(
                f"{what} needs {len(tokens)} tokens, but the context has room for {max(room - 1, 0)} more "
                f"({len(self.tokens)} of n_ctx {self.n_ctx} used); hand off or save the context and start a new "
                "chat, or raise n_ctx for this agent"
            )
        self.tokens += tokens

    # -- KV cache

    def _truncate(self, n_tokens: int) -> None:
        """Drop cached cells from position `n_tokens` on."""
        if self.n_cached <= n_tokens:
            return
        with self.model_lock:
            memory = llama_cpp.llama_get_memory(self.llm.ctx)
            if not llama_cpp.llama_memory_seq_rm(memory, self.seq_id, n_tokens, -1):
                raise RuntimeError(
                    f"llama.cpp could not remove the cells after position {n_tokens} of seq_id {self.seq_id}"
                )
            if self.seq_id == 0:
                self.llm.n_tokens = n_tokens
        self.n_cached = n_tokens

    def _eval_locked(self, tokens: Sequence[int]) -> None:
        """Decode tokens after the cached ones; the caller holds `model_lock`."""
        if self.seq_id == 0:
            self.llm.n_tokens = self.n_cached
        self.llm.eval_sequence(tokens, self.seq_id)
        self.n_cached += len(tokens)

    def sync(self, progress: ProgressCallback | None = None) -> int:
        """Decode the tokens that are not cached yet; return how many were decoded."""
        total = len(self.tokens) - self.n_cached
        done = 0
        while self.n_cached < len(self.tokens):
            chunk = self.tokens[self.n_cached : self.n_cached + PREFILL_CHUNK]
            with self.model_lock:
                self._eval_locked(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        return total

    def _prefill_logits(self, progress: ProgressCallback | None) -> np.ndarray:
        """Decode the uncached tokens and return the logits after the last one.

        The last chunk and the logits read share one lock, because another
        session's decode on the same context replaces the logits. When every
        token is cached already (after a card import), the last one is decoded again.
        """
        if self.n_cached == len(self.tokens):
            self._truncate(len(self.tokens) - 1)
        total = len(self.tokens) - self.n_cached
        while len(self.tokens) - self.n_cached > PREFILL_CHUNK:
            with self.model_lock:
                self._eval_locked(self.tokens[self.n_cached : self.n_cached + PREFILL_CHUNK])
            if progress is not None:
                progress(total - (len(self.tokens) - self.n_cached), total)
        with self.model_lock:
            self._eval_locked(self.tokens[self.n_cached :])
            logits = self.llm.last_logits()
        if progress is not None:
            progress(total, total)
        return logits

    def clear(self) -> None:
        """Empty the sequence and forget the conversation."""
        with self.model_lock:
            memory = llama_cpp.llama_get_memory(self.llm.ctx)
            llama_cpp.llama_memory_seq_rm(memory, self.seq_id, -1, -1)
            if self.seq_id == 0:
                self.llm.n_tokens = 0
        self.tokens, self.n_cached, self.state, self.preamble, self.turns = [], 0, "empty", "", 0
        self.source_card = None

    # -- conversation

    def add_document(self, name: str, text: str, progress: ProgressCallback | None = None) -> int:
        """Prefill a file's text; return its token count.

        With a chat template the file opens a user message that the next
        message joins, so the question follows the file. In the plain format
        it is context text before the next question.

        Raises:
            ContextFullError: the file does not fit in the context (nothing is appended then).
        """
        content = f"Contents of {name}:\n\n{text.rstrip()}"
        if self.format.document_in_turn:
            added = self.add_user(content, open_reply=False, what=f"file {name}")
        else:
            if self.state != "empty":
                segments: list[Segment] = [("\n\n", False)]
            elif self.system:
                segments = [(self.system + "\n\n", False)]
            else:
                segments = []
            tokens = self._tokenize([*segments, (content, False)])
            self._append(tokens, f"file {name}")
            self.state = "context"
            added = len(tokens)
        self.sync(progress if added >= PROGRESS_MIN_TOKENS else None)
        return added

    def add_user(self, content: str, *, open_reply: bool = True, what: str = "the message") -> int:
        """Append a user message; return the tokens added.

        With `open_reply` the assistant's reply is opened after it, so `generate` can follow. Without, the
        user message stays open and the next user message joins it.

        Raises:
            ContextFullError: the message does not fit in the context (nothing is appended then).
        """
        segments = self._message_segments(content)
        if open_reply:
            segments.append((self.format.assistant_prompt, True))
        tokens = self._tokenize(segments)
        self._append(tokens, what)
        self.preamble = ""
        self.state = "assistant" if open_reply else "user_open"
        return len(tokens)

    def add_assistant(self, content: str) -> int:
        """Append a reply written elsewhere (a past assistant message sent by an API client); return the tokens added.

        Raises:
            ValueError: no user message comes before it.
            ContextFullError: the reply does not fit in the context.
        """
        segments: list[Segment] = []
        if self.state == "user_open":
            segments.append((self.format.assistant_prompt, True))
        elif self.state != "assistant":
            raise ValueError("an assistant message must follow a user message")
        segments.append((" " + content.strip() if self.format.name == "plain" else content, False))
        tokens = self._tokenize(segments)
        self._append(tokens, "the assistant message")
        self.state = "assistant"
        return len(tokens)

    def checkpoint(self) -> tuple[int, str, str]:
        """Return a mark that `rollback` restores: the token count, the state and the preamble."""
        return len(self.tokens), self.state, self.preamble

    def rollback(self, mark: tuple[int, str, str]) -> None:
        """Forget everything appended after `checkpoint` returned `mark`."""
        n_tokens, self.state, self.preamble = mark
        del self.tokens[n_tokens:]
        self._truncate(n_tokens)

    def ask(
        self,
        content: str,
        *,
        max_tokens: int = 256,
        on_text: TextCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Reply:
        """Add a user message and generate the reply, passing its text to `on_text` as it is generated.

        Raises:
            ContextFullError: the message does not fit in the context.
        """
        self.add_user(content)
        return self.generate(max_tokens=max_tokens, on_text=on_text, should_stop=should_stop, progress=progress)

    def generate(
        self,
        *,
        max_tokens: int = 256,
        on_text: TextCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: ProgressCallback | None = None,
        sampling: SamplingSettings | None = None,
        seed: int | None = None,
    ) -> Reply:
        """Generate the assistant's reply after the current text (which must end with the assistant prompt).

        `sampling` replaces the session's settings for this reply, and `seed`
        restarts its random generator (otherwise it continues from the last reply).

        Raises:
            ContextFullError: the context has no room for a reply.
        """
        start = time.perf_counter()
        settings = sampling or self.sampling
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        cached = self.n_cached
        prompt_tokens = len(self.tokens) - self.n_cached
        room = self.n_ctx - len(self.tokens)
        if room < 1:
            raise ContextFullError(
                f"the context is full ({len(self.tokens)} of n_ctx {self.n_ctx} tokens); hand off or save the "
                "context and start a new chat, or raise n_ctx for this agent"
            )
        limit = min(max_tokens, room)
        if progress is not None and prompt_tokens < PROGRESS_MIN_TOKENS:
            progress = None
        logits = self._prefill_logits(progress)

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = _StopScanner(self.format.stop)
        reply_start = len(self.tokens)
        piece_ends: list[int] = []  # text length after each generated token
        finish = "length"
        stopped_by_string = False
        ttft_ms = 0.0
        vocab = self.llm._model.vocab
        for index in range(limit):
            token = sample_token(logits, settings, self._rng, self.tokens[-settings.repeat_last_n :])
            if index == 0:
                ttft_ms = (time.perf_counter() - start) * 1e3
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            self.tokens.append(token)
            piece = decoder.decode(self.llm.detokenize([token]))
            piece_ends.append((piece_ends[-1] if piece_ends else 0) + len(piece))
            shown, stopped_by_string = scanner.feed(piece)
            if shown and on_text is not None:
                on_text(shown)
            if stopped_by_string:
                finish = "stop"
                # Keep the tokens whose text lies before the stop string; the token holding its start goes.
                kept = sum(1 for end in piece_ends if end <= len(scanner.emitted))
                del self.tokens[reply_start + kept :]
                self._truncate(len(self.tokens))
                break
            if index == limit - 1:
                # The last token stays uncached; the next turn decodes it with its own tokens.
                break
            if should_stop is not None and should_stop():
                finish = "interrupted"
                break
            with self.model_lock:
                self._eval_locked([token])
                logits = self.llm.last_logits()
        if not stopped_by_string:
            rest, hit = scanner.feed(decoder.decode(b"", final=True))
            if not hit:
                rest += scanner.flush()
            if rest and on_text is not None:
                on_text(rest)

        self.turns += 1
        reply = Reply(
            text=scanner.emitted,
            n_tokens=len(self.tokens) - reply_start,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            ttft_ms=ttft_ms,
            total_ms=(time.perf_counter() - start) * 1e3,
        )
        self.last_reply = reply
        return reply

    # -- cards

    def export_card(self, *, budget: float, controller: str) -> CacheCard:
        """Export the conversation as a card, with the hop count and parent of the card it came from.

        Raises:
            ValueError: the conversation is empty (and the errors of `Llama.export_card`).
        """
        if not self.tokens:
            raise ValueError("the context is empty, so there is nothing to export; send a message or load a file first")
        self.sync()
        parent = self.source_card
        with self.model_lock:
            return self.llm.export_card(
                budget=budget,
                controller=controller,
                seq_id=self.seq_id,
                tokens=self.tokens[: self.n_cached],
                hop=parent.provenance.hop + 1 if parent is not None else 1,
                parent_sha256=parent.sha256 if parent is not None else "",
            )

    def import_card(self, card: CacheCard, *, state: str = "opaque", preamble: str = "") -> None:
        """Replace the conversation with a card's context.

        Raises:
            ValueError: the card's positions are not 0..n_tokens-1 (and the errors of `Llama.import_card`).
        """
        positions = card.positions
        if card.n_tokens == 0 or positions[0] != 0 or positions[-1] != card.n_tokens - 1:
            raise ValueError(
                "the card's positions are not 0..n_tokens-1, so a chat cannot continue after them; "
                "export the card from a chat or a prefilled context"
            )
        with self.model_lock:
            self.llm.import_card(card, seq_id=self.seq_id, replace=True)
        self.tokens = [int(t) for t in card.token_ids]
        self.n_cached = card.n_tokens
        self.state = state
        self.preamble = preamble
        self.source_card = card


# -- agents ---------------------------------------------------------------------


class Agent(Protocol):
    """An agent that a chat or a pipeline talks to: a local context or a remote `qkvedge serve` session."""

    name: str

    @property
    def n_tokens(self) -> int: ...

    @property
    def n_ctx(self) -> int: ...

    def describe(self) -> str: ...

    def ask(
        self,
        content: str,
        *,
        max_tokens: int | None = None,
        on_text: TextCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Reply: ...

    def add_document(self, name: str, text: str, progress: ProgressCallback | None = None) -> int: ...

    def export_card(self, *, budget: float, controller: str) -> CacheCard: ...

    def receive_card(self, data: bytes, *, state: str, preamble: str) -> None: ...

    def close(self) -> None: ...


class LocalAgent:
    """An agent of the agents file, running in its own `Llama` context in this process."""

    def __init__(self, config: AgentConfig, llm: Llama) -> None:
        self.config = config
        self.name = config.name
        self.llm = llm
        self.session = ChatSession(llm, chat_format_for(llm), SamplingSettings.from_agent(config), system=config.system)

    @property
    def n_tokens(self) -> int:
        return len(self.session.tokens)

    @property
    def n_ctx(self) -> int:
        return self.session.n_ctx

    def describe(self) -> str:
        return f"{self.name} ({Path(self.config.model).name}, n_ctx {self.n_ctx}, {self.session.format.name} format)"

    def ask(
        self,
        content: str,
        *,
        max_tokens: int | None = None,
        on_text: TextCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Reply:
        return self.session.ask(
            content,
            max_tokens=max_tokens or self.config.max_tokens,
            on_text=on_text,
            should_stop=should_stop,
            progress=progress,
        )

    def add_document(self, name: str, text: str, progress: ProgressCallback | None = None) -> int:
        return self.session.add_document(name, text, progress)

    def export_card(self, *, budget: float, controller: str) -> CacheCard:
        return self.session.export_card(budget=budget, controller=controller)

    def receive_card(self, data: bytes, *, state: str, preamble: str) -> None:
        self.session.import_card(CacheCard.from_bytes(data), state=state, preamble=preamble)

    def close(self) -> None:
        self.session.clear()


class RemoteAgent:
    """A session of a `qkvedge serve` agent, created from a card and continued over HTTP."""

    def __init__(self, client: AgentClient) -> None:
        self.client = client
        self.name = client.url
        self.session_id: str | None = None
        self.info: dict[str, Any] = {}
        self._n_tokens = 0
        self._n_ctx = 0

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def describe(self) -> str:
        agent = self.info.get("agent", "?")
        return f"{self.client.url} (agent {agent}, session {self.session_id or '-'})"

    def ask(
        self,
        content: str,
        *,
        max_tokens: int | None = None,
        on_text: TextCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Reply:
        if self.session_id is None:
            raise ValueError(f"no session on {self.client.url} yet; hand a card to it first")
        reply, n_context = self.client.chat(
            self.session_id,
            [{"role": "user", "content": content}],
            max_tokens=max_tokens,
            on_text=on_text,
            should_stop=should_stop,
        )
        if n_context is None:
            # A stopped reply has no final chunk; the server stops at its next token.
            n_context = int(self.client.session_info(self.session_id)["n_tokens"])
        self._n_tokens = n_context
        return reply

    def add_document(self, name: str, text: str, progress: ProgressCallback | None = None) -> int:
        raise ValueError(
            f"cannot load {name} into the remote agent {self.client.url}; load files before handing off to it"
        )

    def export_card(self, *, budget: float, controller: str) -> CacheCard:
        if self.session_id is None:
            raise ValueError(f"no session on {self.client.url} yet; hand a card to it first")
        return self.client.fetch_card(self.session_id, budget=budget, controller=controller)

    def receive_card(self, data: bytes, *, state: str, preamble: str) -> None:
        # The server puts its own agent's system prompt before the next message; `state` and `preamble`
        # describe a local context and do not apply.
        self.close()
        info = self.client.post_card(data)
        self.session_id = str(info["session_id"])
        self.info = info
        self._n_tokens = int(info["n_tokens"])
        self._n_ctx = int(info["n_ctx"])

    def close(self) -> None:
        if self.session_id is not None:
            self.client.delete_session(self.session_id)
            self.session_id = None


class AgentPool:
    """Agents by name (loaded on first use, then kept) and remote agents by URL."""

    def __init__(self, agents: AgentsFile, *, threads: int | None = None) -> None:
        self.agents = agents
        self.threads = threads
        self._loaded: dict[str, Agent] = {}

    def is_loaded(self, target: str) -> bool:
        """Return whether `get(target)` returns an agent that is already loaded or connected."""
        return target in self._loaded

    def get(self, target: str) -> Agent:
        """Return the agent for an agent name or a `qkvedge serve` URL, loading its model on first use.

        Raises:
            AgentsFileError: no agent has that name.
            ValueError, FileNotFoundError, ModuleNotFoundError: the agent's model cannot be found.
        """
        agent = self._loaded.get(target)
        if agent is not None:
            return agent
        if is_url(target):
            from .server import AgentClient

            agent = RemoteAgent(AgentClient(target))
            agent.info = agent.client.health()
            agent.name = f"{agent.info['agent']}@{urllib.parse.urlsplit(target).netloc}"
        else:
            agent = self._load(self.agents.get(target))
        self._loaded[target] = agent
        return agent

    def _load(self, config: AgentConfig) -> LocalAgent:
        from .llama import Llama
        from .models import resolve_model

        model_path = resolve_model(config.model)
        kwargs = config.llama_kwargs()
        if self.threads is not None:
            kwargs["n_threads"] = kwargs["n_threads_batch"] = self.threads
        start = time.perf_counter()
        llm = Llama(str(model_path), **kwargs)
        logger.info("loaded agent %s: %s in %.0f ms", config.name, model_path, (time.perf_counter() - start) * 1e3)
        return LocalAgent(config, llm)

    def close(self) -> None:
        """Close remote sessions and free the contexts."""
        for agent in self._loaded.values():
            try:
                agent.close()
            except (QKVShareError, OSError, ValueError) as exc:
                logger.warning("could not close agent %s: %s", agent.name, exc)
            if isinstance(agent, LocalAgent):
                agent.llm.close()
        self._loaded.clear()


# -- handoff --------------------------------------------------------------------


@dataclass
class HandoffResult:
    """The record of one handoff: what it moved and how long its stages took."""

    source: str
    target: str
    n_tokens: int
    card_bytes: int
    budget: float
    controller: str
    hop: int
    export_ms: float  # export and serialization
    import_ms: float  # parsing, verification and import (for a remote agent: the upload round trip)
    ttft_ms: float | None = None  # the receiver's time to first token on its first reply
    card: CacheCard | None = field(default=None, repr=False)

    def summary(self) -> str:
        """Return the one-line summary printed for each handoff."""
        ttft = f"{self.ttft_ms:.0f} ms" if self.ttft_ms is not None else "-"
        return (
            f"handoff {self.source} -> {self.target}: {self.n_tokens:,} tokens | card {self.card_bytes:,} bytes | "
            f"budget {self.budget:g} ({self.controller}) | hop {self.hop} | export {self.export_ms:.0f} ms | "
            f"import {self.import_ms:.0f} ms | TTFT {ttft}"
        )


def handoff_settings(agent: Agent) -> tuple[float, str]:
    """Return the budget and controller that `agent` hands off with: its agents-file settings, else the defaults."""
    if isinstance(agent, LocalAgent):
        return agent.config.budget, agent.config.controller
    return DEFAULT_AGENT_BUDGET_BITS, DEFAULT_CONTROLLER


def hand_off(source: Agent, target: Agent, *, budget: float, controller: str) -> HandoffResult:
    """Export `source`'s context as a card and import it into `target`, which then continues the conversation.

    The card is serialized and parsed again even between two local agents, so
    the handoff takes the same path as one between processes. The target's
    system prompt, when it differs from the source's, opens its next user
    message (the context already contains the source's system prompt).
    """
    start = time.perf_counter()
    card = source.export_card(budget=budget, controller=controller)
    # Signed with the shared key from QKVEDGE_CARD_KEY when it is set.
    data = card.to_bytes(key=load_key())
    export_ms = (time.perf_counter() - start) * 1e3

    state = source.session.state if isinstance(source, LocalAgent) else "opaque"
    preamble = ""
    if isinstance(target, LocalAgent):
        source_system = source.config.system if isinstance(source, LocalAgent) else ""
        if target.config.system and target.config.system != source_system:
            preamble = target.config.system + "\n\n"
        if isinstance(source, LocalAgent) and source.session.format != target.session.format:
            state = "opaque"
    start = time.perf_counter()
    target.receive_card(data, state=state, preamble=preamble)
    import_ms = (time.perf_counter() - start) * 1e3
    result = HandoffResult(
        source=source.name,
        target=target.name,
        n_tokens=card.n_tokens,
        card_bytes=len(data),
        budget=budget,
        controller=controller,
        hop=card.provenance.hop,
        export_ms=export_ms,
        import_ms=import_ms,
        card=card,
    )
    logger.info(
        "handed off %s -> %s: %d tokens, %d card bytes, export %.1f ms, import %.1f ms",
        source.name,
        target.name,
        result.n_tokens,
        result.card_bytes,
        export_ms,
        import_ms,
    )
    return result


# -- terminal helpers -------------------------------------------------------------


class ProgressBar:
    """A one-line prefill progress bar on a terminal stream; draws nothing when the stream is not a terminal."""

    def __init__(self, stream: TextIO, label: str, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.width = width
        self.start = time.perf_counter()
        self.drawn = False
        self.enabled = stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        filled = self.width * done // total
        seconds = time.perf_counter() - self.start
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} tokens {seconds:.1f} s")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """Erase the bar, so the next output starts on a clean line."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


@contextlib.contextmanager
def interrupt_flag() -> Iterator[threading.Event]:
    """Turn Ctrl-C into a flag while generating, so a reply stops between tokens and the session stays consistent."""
    import signal

    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# -- interactive chat -------------------------------------------------------------

CHAT_HELP = """\
commands:
  /handoff [AGENT|URL] [MESSAGE]  hand the context to another agent as a card and continue with it;
                                  MESSAGE, if given, is sent to it at once
  /load FILE                      prefill a text file into the context
  /save PATH                      write the current context as a card file
  /budget [BITS] [CONTROLLER]     show or set the card budget (bits per element) and controller
  /stats                          context size, last reply, handoffs
  /agents                         list the agents
  /help                           this help
  /quit                           leave (Ctrl-D too); Ctrl-C stops a reply"""


class ChatRepl:
    """The interactive chat of `qkvedge chat`: streams replies, runs slash commands, hands off between agents."""

    def __init__(
        self,
        pool: AgentPool,
        agent: str | None,
        *,
        handoff_to: str | None = None,
        handoff_after: int | None = None,
        out: TextIO,
        err: TextIO,
        read_line: Callable[[str], str] = input,
    ) -> None:
        self.pool = pool
        self.out = out
        self.err = err
        self.read_line = read_line
        self.handoff_to = handoff_to
        self.handoff_after = handoff_after
        self.budget: float | None = None
        self.controller: str | None = None
        self.handoffs: list[HandoffResult] = []
        self.pending: HandoffResult | None = None
        self.turns = 0  # user turns with the current agent
        self.auto_handoff_done = False
        self.agent = self._get_agent(agent or pool.agents.default_agent)

    # -- output

    def _say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _error(self, text: str) -> None:
        self.err.write(f"error: {text}\n")
        self.err.flush()

    def _get_agent(self, target: str) -> Agent:
        if not self.pool.is_loaded(target) and not is_url(target):
            self.err.write(f"loading {target} ...\n")
            self.err.flush()
        return self.pool.get(target)

    # -- settings

    def handoff_settings(self) -> tuple[float, str]:
        """Return the budget and controller of the next handoff: set by /budget, else the current agent's."""
        budget, controller = handoff_settings(self.agent)
        return (self.budget if self.budget is not None else budget), (self.controller or controller)

    def default_target(self) -> str | None:
        if self.handoff_to is not None and self.handoff_to != self.agent.name:
            return self.handoff_to
        if isinstance(self.agent, LocalAgent):
            return self.pool.agents.handoff_target(self.agent.name)
        return None

    # -- loop

    def run(self) -> int:
        """Read lines until /quit or end of input; return the exit status."""
        if self.handoff_to is not None:
            self._get_agent(self.handoff_to)
        self._say(f"chat with {self.agent.describe()}; /help lists commands, /quit leaves")
        while True:
            try:
                line = self.read_line(f"{self.agent.name}> ")
            except EOFError:
                self._say()
                return 0
            except KeyboardInterrupt:
                self._say()
                continue
            line = line.strip()
            if not line:
                continue
            try:
                if not self.handle(line):
                    return 0
            except (QKVShareError, ValueError, OSError) as exc:
                self._error(str(exc))

    def handle(self, line: str) -> bool:
        """Run one input line; return False to leave the chat."""
        if not line.startswith("/") or line.startswith("//"):
            self.ask(line[1:] if line.startswith("//") else line)
            return True
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        if command in ("/quit", "/exit", "/q"):
            return False
        if command == "/help":
            self._say(CHAT_HELP)
        elif command == "/handoff":
            self.command_handoff(rest)
        elif command == "/load":
            self.command_load(rest)
        elif command == "/save":
            self.command_save(rest)
        elif command == "/budget":
            self.command_budget(rest)
        elif command == "/stats":
            self.command_stats()
        elif command == "/agents":
            self.command_agents()
        else:
            self._error(f"unknown command {command}; /help lists the commands")
        return True

    def ask(self, text: str) -> Reply:
        """Send a message to the current agent and stream its reply."""
        if (
            self.handoff_after is not None
            and not self.auto_handoff_done
            and self.turns >= self.handoff_after
            and self.default_target() is not None
        ):
            self.auto_handoff_done = True
            self.handoff(str(self.default_target()))
        start = time.perf_counter()
        first = True
        pending = self.pending
        bar = ProgressBar(self.err, "prefill")

        def on_text(piece: str) -> None:
            nonlocal first
            if first:
                first = False
                bar.close()
                if pending is not None:
                    pending.ttft_ms = (time.perf_counter() - start) * 1e3
                    self.out.write(pending.summary() + "\n")
                self.out.write(f"{self.agent.name}: ")
            self.out.write(piece)
            self.out.flush()

        with interrupt_flag() as stop:
            try:
                reply = self.agent.ask(text, on_text=on_text, should_stop=stop.is_set, progress=bar)
            finally:
                bar.close()
        if first:
            if pending is not None:
                pending.ttft_ms = reply.ttft_ms
                self.out.write(pending.summary() + "\n")
            self.out.write(f"{self.agent.name}: (no text; the reply ended at once)")
        if reply.finish_reason == "interrupted":
            self.out.write(" [stopped]")
        self._say()
        self.pending = None
        self.turns += 1
        return reply

    # -- commands

    def handoff(self, target_name: str, message: str = "") -> HandoffResult:
        """Hand the context to `target_name` and make it the current agent."""
        if target_name == self.agent.name:
            raise ValueError(f"{target_name} is the current agent; name another agent: /handoff AGENT")
        target = self._get_agent(target_name)
        budget, controller = self.handoff_settings()
        result = hand_off(self.agent, target, budget=budget, controller=controller)
        self.handoffs.append(result)
        self.agent = target
        self.turns = 0
        self.pending = result
        if message:
            self.ask(message)
        return result

    def command_handoff(self, rest: str) -> None:
        first, _, remainder = rest.partition(" ")
        if first and (first in self.pool.agents.agents or is_url(first)):
            target, message = first, remainder.strip()
        else:
            target, message = self.default_target(), rest
        if target is None:
            raise ValueError("no handoff target; name one (/handoff AGENT), or start the chat with --handoff-to")
        self.handoff(target, message)
        if not message:
            self._say(f"now chatting with {self.agent.describe()}; the handoff summary prints with its first reply")

    def command_load(self, rest: str) -> None:
        if not rest:
            raise ValueError("name the file to load: /load FILE")
        path = Path(rest).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        bar = ProgressBar(self.err, f"prefill {path.name}")
        start = time.perf_counter()
        try:
            n_tokens = self.agent.add_document(path.name, text, bar)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        self._say(
            f"loaded {path}: {n_tokens:,} tokens in {seconds:.1f} s; context {self.agent.n_tokens:,} of "
            f"{self.agent.n_ctx:,} tokens"
        )

    def command_save(self, rest: str) -> None:
        if not rest:
            raise ValueError("name the card file: /save PATH (for example /save context.qkvc)")
        budget, controller = self.handoff_settings()
        start = time.perf_counter()
        card = self.agent.export_card(budget=budget, controller=controller)
        path = card.save(Path(rest).expanduser())
        milliseconds = (time.perf_counter() - start) * 1e3
        self._say(
            f"saved {path}: {card.n_tokens:,} tokens, {path.stat().st_size:,} bytes, budget {budget:g} "
            f"({controller}), hop {card.provenance.hop}, {milliseconds:.0f} ms"
        )

    def command_budget(self, rest: str) -> None:
        from .controllers import CONTROLLERS

        words = rest.split()
        if len(words) > 2:
            raise ValueError("usage: /budget [BITS] [CONTROLLER]")
        if words:
            try:
                budget = float(words[0])
            except ValueError as exc:
                raise ValueError(f"budget {words[0]!r} is not a number; use bits per element in (0, 16]") from exc
            if not 0 < budget <= 16:
                raise ValueError(f"budget {budget:g} is out of range; use bits per element in (0, 16]")
            if len(words) == 2 and words[1] not in CONTROLLERS:
                raise ValueError(f"unknown controller {words[1]!r}; use one of {', '.join(sorted(CONTROLLERS))}")
            self.budget = budget
            if len(words) == 2:
                self.controller = words[1]
        budget, controller = self.handoff_settings()
        self._say(f"card budget {budget:g} bits per element, controller {controller}")

    def command_stats(self) -> None:
        agent = self.agent
        budget, controller = self.handoff_settings()
        share = 100.0 * agent.n_tokens / agent.n_ctx if agent.n_ctx else 0.0
        self._say(f"agent:      {agent.describe()}")
        self._say(f"context:    {agent.n_tokens:,} of {agent.n_ctx:,} tokens ({share:.0f}%), {self.turns} turns")
        self._say(f"budget:     {budget:g} bits per element, {controller}")
        last = agent.session.last_reply if isinstance(agent, LocalAgent) else None
        if last is not None:
            self._say(
                f"last reply: {last.n_tokens} tokens, TTFT {last.ttft_ms:.0f} ms, "
                f"{last.tokens_per_second:.1f} tokens/s, {last.prompt_tokens} prompt tokens decoded, "
                f"{last.cached_tokens} reused"
            )
        self._say(f"handoffs:   {len(self.handoffs)}")
        for result in self.handoffs:
            self._say(f"  {result.summary()}")

    def command_agents(self) -> None:
        agents = self.pool.agents
        self._say(f"agents ({agents.source}):")
        for name, config in agents.agents.items():
            marker = "*" if name == self.agent.name else " "
            target = agents.handoff_target(name) or "-"
            self._say(f"{marker} {name:12} model {config.model}, n_ctx {config.n_ctx}, hands off to {target}")


def run_single(
    pool: AgentPool,
    agent: str | None,
    *,
    ask: str,
    prompt_file: Path | None,
    handoff_to: str | None,
    out: TextIO,
    err: TextIO,
    stream: bool = True,
) -> tuple[Reply, HandoffResult | None, str]:
    """Prefill a file, hand off once, and ask one question; return the reply, the handoff and the answering agent.

    The reply streams to `out` when `stream` is set; the handoff summary goes to `err`.
    """
    current = pool.get(agent or pool.agents.default_agent)
    if prompt_file is not None:
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the prompt file {prompt_file}: {exc}") from exc
        bar = ProgressBar(err, f"prefill {prompt_file.name}")
        try:
            current.add_document(prompt_file.name, text, bar)
        finally:
            bar.close()
    result = None
    if handoff_to is not None:
        if current.n_tokens == 0:
            raise ValueError(f"{current.name} has no context to hand off to {handoff_to}; pass --prompt-file")
        target = pool.get(handoff_to)
        budget, controller = handoff_settings(current)
        result = hand_off(current, target, budget=budget, controller=controller)
        current = target

    start = time.perf_counter()
    first_text_ms: float | None = None

    def on_text(piece: str) -> None:
        nonlocal first_text_ms
        if first_text_ms is None:
            first_text_ms = (time.perf_counter() - start) * 1e3
        if stream:
            out.write(piece)
            out.flush()

    reply = current.ask(ask, on_text=on_text)
    if stream:
        out.write("\n")
        out.flush()
    if result is not None:
        result.ttft_ms = first_text_ms if first_text_ms is not None else reply.ttft_ms
        err.write(result.summary() + "\n")
        err.flush()
    return reply, result, current.name
