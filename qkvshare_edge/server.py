"""`qkvedge serve`: one agent as an HTTP server that imports CacheCards and continues them as chat sessions.

Endpoints (JSON unless noted):

- `GET /health`: agent, model, session counts.
- `GET /v1/models`: the agent's model, in the OpenAI list shape.
- `POST /v1/cards`: body = card bytes; imports the card into a new session
  and returns `{"session_id", "n_tokens", "n_ctx", "import_ms", ...}` (201).
  The query parameter `note` adds text before the session's first message.
- `POST /v1/chat/completions`: OpenAI-compatible (`messages`, `max_tokens`,
  `temperature`, `top_p`, `seed`, `stream`), plus `session_id` to continue a
  session. Without `session_id` the request runs in a temporary session.
- `GET /v1/sessions`, `GET /v1/sessions/ID`, `DELETE /v1/sessions/ID`.
- `GET /v1/sessions/ID/card?budget=B&controller=C`: the session's context
  as a card (body = card bytes), for the next hop.

Design: the server loads its model once, in one llama.cpp context with one
sequence per session (`n_seq_max = max_sessions + 1`, `kv_unified = False`,
so each sequence has its own `n_ctx` cells and sessions never share cells).
Sequence 0 stays unused, because llama-cpp-python's `eval` on sequence 0
removes cells of every sequence. Sessions decode one step at a time under a
model lock, so concurrent sessions interleave token by token. A per-session
lock rejects a second request on a busy session with 409.

Status codes: 400 invalid request or corrupt card, 404 unknown session or
path, 409 session busy, 411 missing Content-Length, 413 body too large, 422
card from another model, 503 no free session slot, 507 context full.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .agents import AgentConfig
from .card import CacheCard
from .chat import ChatSession, ContextFullError, Reply, SamplingSettings, TextCallback, chat_format_for
from .controllers import CONTROLLERS
from .errors import (
    CardFormatError,
    CardSignatureError,
    ContextTooSmallError,
    ImportFailedError,
    ModelMismatchError,
    QKVShareError,
)

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_SESSIONS = 4
DEFAULT_MAX_CARD_BYTES = 256 << 20
DEFAULT_SESSION_TTL_S = 1800.0
MAX_JSON_BYTES = 4 << 20
# Seconds a connection may stay silent while the server reads a request.
READ_TIMEOUT_S = 60.0


class HTTPError(Exception):
    """An error sent back as an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: HTTPStatus, message: str, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


@dataclass
class ServerSession:
    """A conversation on one sequence of the server's context."""

    session_id: str
    chat: ChatSession
    created: float
    last_used: float
    # Messages received and replies sent, to find the new messages of a request that resends the history.
    history: list[dict[str, str]] = field(default_factory=list)
    card_sha256: str = ""
    card_hop: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "n_tokens": len(self.chat.tokens),
            "n_ctx": self.chat.n_ctx,
            "turns": self.chat.turns,
            "card_sha256": self.card_sha256,
            "card_hop": self.card_hop,
            "idle_s": round(time.time() - self.last_used, 1),
        }


# -- the service, independent of HTTP ----------------------------------------------


class AgentService:
    """The agent's model, its sessions, and the operations that the HTTP endpoints call.

    Methods raise `HTTPError` with the status of the response.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        threads: int | None = None,
        max_card_bytes: int = DEFAULT_MAX_CARD_BYTES,
        session_ttl_s: float = DEFAULT_SESSION_TTL_S,
        card_key: bytes | None = None,
        require_signed: bool = False,
    ) -> None:
        from .llama import Llama
        from .models import resolve_model

        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.config = config
        self.max_sessions = max_sessions
        self.max_card_bytes = max_card_bytes
        self.session_ttl_s = session_ttl_s
        if require_signed and card_key is None:
            raise ValueError("require_signed needs a shared key: pass --key-file or set QKVEDGE_CARD_KEY")
        # The shared HMAC key verifies incoming cards and signs exported ones.
        self.card_key = card_key
        self.require_signed = require_signed
        self.model_path = resolve_model(config.model)
        kwargs = config.llama_kwargs()
        if threads is not None:
            kwargs["n_threads"] = kwargs["n_threads_batch"] = threads
        n_seq = max_sessions + 1
        kwargs["n_ctx"] = config.n_ctx * n_seq
        self.llm = Llama(str(self.model_path), n_seq_max=n_seq, kv_unified=False, **kwargs)
        self.format = chat_format_for(self.llm)
        self.sampling = SamplingSettings.from_agent(config)
        self.model_lock = threading.Lock()
        self._sessions: dict[str, ServerSession] = {}
        self._free_seq_ids = list(range(max_sessions, 0, -1))
        self._sessions_lock = threading.Lock()
        logger.info(
            "agent %s: model %s, %d session slots of n_ctx %d",
            config.name,
            self.model_path,
            max_sessions,
            config.n_ctx,
        )

    @property
    def model_name(self) -> str:
        return Path(self.config.model).name

    def health(self) -> dict[str, Any]:
        with self._sessions_lock:
            n_sessions = len(self._sessions)
        return {
            "status": "ok",
            "agent": self.config.name,
            "model": self.model_name,
            "architecture": self.llm.fingerprint.architecture,
            "model_id": self.llm.fingerprint.model_id,
            "chat_format": self.format.name,
            "n_ctx": self.config.n_ctx,
            "sessions": n_sessions,
            "max_sessions": self.max_sessions,
            "max_card_bytes": self.max_card_bytes,
        }

    def close(self) -> None:
        """Drop every session and free the model."""
        with self._sessions_lock:
            self._sessions.clear()
        self.llm.close()

    # -- sessions

    def _new_session(self, *, system: str = "") -> ServerSession:
        """Reserve a sequence for a session that the caller registers or discards."""
        with self._sessions_lock:
            self._evict_idle()
            if not self._free_seq_ids:
                raise HTTPError(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    f"all {self.max_sessions} session slots are in use; DELETE /v1/sessions/ID for a finished "
                    "session, retry later, or restart the server with a larger --max-sessions",
                    "server_busy",
                )
            seq_id = self._free_seq_ids.pop()
        chat = ChatSession(
            self.llm, self.format, self.sampling, seq_id=seq_id, system=system, model_lock=self.model_lock
        )
        now = time.time()
        return ServerSession(session_id=f"sess-{secrets.token_hex(8)}", chat=chat, created=now, last_used=now)

    def _evict_idle(self) -> None:
        """Remove sessions idle for longer than the TTL; the caller holds the sessions lock."""
        if self.session_ttl_s <= 0:
            return
        now = time.time()
        for session_id, session in list(self._sessions.items()):
            idle = now - session.last_used
            if idle > self.session_ttl_s and session.lock.acquire(blocking=False):
                try:
                    logger.info("removing session %s after %.0f s idle", session_id, idle)
                    del self._sessions[session_id]
                    self._release(session)
                finally:
                    session.lock.release()

    def _release(self, session: ServerSession) -> None:
        """Empty a session's sequence and return it to the free list; the caller holds the sessions lock."""
        session.chat.clear()
        self._free_seq_ids.append(session.chat.seq_id)

    def _discard(self, session: ServerSession) -> None:
        with self._sessions_lock:
            self._release(session)

    def _get(self, session_id: str) -> ServerSession:
        with self._sessions_lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise HTTPError(
                HTTPStatus.NOT_FOUND,
                f"no session {session_id!r}: it was deleted, removed after {self.session_ttl_s:.0f} s idle, or the "
                "server restarted; POST the card to /v1/cards again",
                "not_found",
            )
        return session

    @contextlib.contextmanager
    def _using(self, session: ServerSession) -> Iterator[None]:
        self._lock_session(session)
        try:
            yield
        finally:
            session.last_used = time.time()
            session.lock.release()

    def _lock_session(self, session: ServerSession, *, registered: bool = True) -> None:
        """Take a session's lock without waiting, and check that it is still registered once held.

        Between looking a session up and locking it, a delete or the idle
        timeout may have removed it and freed its sequence for another session.
        """
        if not session.lock.acquire(blocking=False):
            raise HTTPError(
                HTTPStatus.CONFLICT,
                f"session {session.session_id} is busy with another request; wait for it to finish and retry",
                "session_busy",
            )
        if registered:
            with self._sessions_lock:
                current = self._sessions.get(session.session_id)
            if current is not session:
                session.lock.release()
                raise HTTPError(
                    HTTPStatus.NOT_FOUND,
                    f"session {session.session_id} was removed while this request waited; POST the card again",
                    "not_found",
                )

    def list_sessions(self) -> list[dict[str, Any]]:
        with self._sessions_lock:
            return [session.info() for session in self._sessions.values()]

    def session_info(self, session_id: str) -> dict[str, Any]:
        return self._get(session_id).info()

    def delete_session(self, session_id: str) -> None:
        session = self._get(session_id)
        with self._using(session), self._sessions_lock:
            if self._sessions.pop(session_id, None) is not None:
                self._release(session)
        logger.info("deleted session %s", session_id)

    # -- cards

    def import_card(self, data: bytes, *, note: str = "") -> dict[str, Any]:
        """Create a session from card bytes; return its id and the import's numbers."""
        start = time.perf_counter()
        try:
            card = CacheCard.from_bytes(
                data, max_bytes=self.max_card_bytes, key=self.card_key, require_signature=self.require_signed
            )
        except CardSignatureError as exc:
            logger.warning("rejected a card: %s", exc)
            raise HTTPError(HTTPStatus.FORBIDDEN, f"card rejected: {exc}", "invalid_signature") from exc
        except CardFormatError as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"invalid card: {exc}", "invalid_card") from exc
        except (QKVShareError, ValueError) as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"card rejected: {exc}", "invalid_card") from exc
        parse_ms = (time.perf_counter() - start) * 1e3

        session = self._new_session()
        preamble = "".join(part + "\n\n" for part in (self.config.system, note) if part)
        try:
            session.chat.import_card(card, preamble=preamble)
        except BaseException as exc:
            self._discard(session)
            raise _import_error(exc, self.model_name) from exc
        session.card_sha256 = card.sha256
        session.card_hop = card.provenance.hop
        with self._sessions_lock:
            self._sessions[session.session_id] = session
        import_ms = (time.perf_counter() - start) * 1e3
        logger.info(
            "session %s: imported card %s (%d tokens, %d bytes, hop %d) into seq %d in %.1f ms",
            session.session_id,
            card.sha256[:12],
            card.n_tokens,
            len(data),
            card.provenance.hop,
            session.chat.seq_id,
            import_ms,
        )
        return {
            "session_id": session.session_id,
            "agent": self.config.name,
            "n_tokens": card.n_tokens,
            "n_ctx": session.chat.n_ctx,
            "card_bytes": len(data),
            "card_sha256": card.sha256,
            "hop": card.provenance.hop,
            "parse_ms": round(parse_ms, 2),
            "import_ms": round(import_ms, 2),
        }

    def export_card(self, session_id: str, *, budget: float | None, controller: str | None) -> tuple[bytes, CacheCard]:
        """Export a session's context as card bytes, with the hop after the card it came from."""
        budget = self.config.budget if budget is None else budget
        controller = controller or self.config.controller
        if not 0 < budget <= 16:
            raise HTTPError(
                HTTPStatus.BAD_REQUEST, f"budget {budget:g} is out of range; use bits per element in (0, 16]"
            )
        if controller not in CONTROLLERS:
            raise HTTPError(
                HTTPStatus.BAD_REQUEST,
                f"unknown controller {controller!r}; use one of {', '.join(sorted(CONTROLLERS))}",
            )
        session = self._get(session_id)
        with self._using(session):
            try:
                card = session.chat.export_card(budget=budget, controller=controller)
            except (QKVShareError, ValueError) as exc:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"cannot export session {session_id}: {exc}") from exc
        data = card.to_bytes(key=self.card_key)
        logger.info(
            "session %s: exported %d tokens as a %d-byte card (hop %d)",
            session_id,
            card.n_tokens,
            len(data),
            card.provenance.hop,
        )
        return data, card

    # -- chat

    def start_chat(self, request: dict[str, Any]) -> ChatRun:
        """Validate a chat completions request and add its new messages to the session.

        The returned run generates the reply; the caller must close it.
        """
        messages = _parse_messages(request.get("messages"))
        max_tokens = _optional_int(request, "max_tokens", 1)
        if max_tokens is None:
            max_tokens = _optional_int(request, "max_completion_tokens", 1)
        sampling = self.sampling
        temperature = _optional_number(request, "temperature", 0.0, 100.0)
        if temperature is not None:
            sampling = replace(sampling, temperature=temperature)
        top_p = _optional_number(request, "top_p", 0.0, 1.0)
        if top_p is not None:
            sampling = replace(sampling, top_p=max(top_p, 1e-6))
        seed = _optional_int(request, "seed", 0)
        stream = request.get("stream", False)
        if not isinstance(stream, bool):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"'stream' must be true or false, got {stream!r}")
        session_id = request.get("session_id")
        if session_id is not None and not isinstance(session_id, str):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"'session_id' must be a string, got {session_id!r}")

        if session_id is None:
            system_parts = [self.config.system] + [m["content"] for m in messages if m["role"] == "system"]
            session = self._new_session(system="\n\n".join(part for part in system_parts if part))
            new = [m for m in messages if m["role"] != "system"]
        else:
            session = self._get(session_id)
            new = _new_messages(session.history, messages)
        run = ChatRun(
            self, session, new, max_tokens or self.config.max_tokens, sampling, seed, stream, session_id is None
        )
        try:
            run.begin()
        except BaseException:
            run.close()
            raise
        return run


class ChatRun:
    """One chat completions request on one session: its new messages, its reply, and the session lock it holds."""

    def __init__(
        self,
        service: AgentService,
        session: ServerSession,
        new_messages: list[dict[str, str]],
        max_tokens: int,
        sampling: SamplingSettings,
        seed: int | None,
        stream: bool,
        temporary: bool,
    ) -> None:
        self.service = service
        self.session = session
        self.new_messages = new_messages
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.seed = seed
        self.stream = stream
        self.temporary = temporary
        self._locked = False
        self._closed = False
        self._mark: tuple[int, str, str] | None = None

    @property
    def session_id(self) -> str | None:
        return None if self.temporary else self.session.session_id

    def begin(self) -> None:
        self.service._lock_session(self.session, registered=not self.temporary)
        self._locked = True
        if not self.new_messages:
            raise HTTPError(
                HTTPStatus.BAD_REQUEST,
                "the request has no new messages: its messages repeat the session's history; add a user message",
            )
        if self.new_messages[-1]["role"] != "user":
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the last message must have role 'user'")
        chat = self.session.chat
        self._mark = chat.checkpoint()
        try:
            _apply_messages(chat, self.new_messages)
        except ContextFullError as exc:
            chat.rollback(self._mark)
            raise HTTPError(HTTPStatus.INSUFFICIENT_STORAGE, str(exc), "context_full") from exc
        except ValueError as exc:
            chat.rollback(self._mark)
            raise HTTPError(HTTPStatus.BAD_REQUEST, str(exc)) from exc

    def generate(self, on_text: TextCallback | None = None, should_stop: Callable[[], bool] | None = None) -> Reply:
        """Generate the reply and record the exchange in the session's history.

        Raises:
            HTTPError: 507 when the context has no room for a reply.
        """
        chat = self.session.chat
        try:
            reply = chat.generate(
                max_tokens=self.max_tokens,
                on_text=on_text,
                should_stop=should_stop,
                sampling=self.sampling,
                seed=self.seed,
            )
        except ContextFullError as exc:
            if self._mark is not None:
                chat.rollback(self._mark)
            raise HTTPError(HTTPStatus.INSUFFICIENT_STORAGE, str(exc), "context_full") from exc
        except BaseException:
            if self._mark is not None:
                chat.rollback(self._mark)
            raise
        self.session.history += [*self.new_messages, {"role": "assistant", "content": reply.text}]
        logger.info(
            "session %s: %d prompt tokens (%d cached), %d reply tokens, TTFT %.0f ms, %s",
            self.session.session_id,
            reply.prompt_tokens + reply.cached_tokens,
            reply.cached_tokens,
            reply.n_tokens,
            reply.ttft_ms,
            reply.finish_reason,
        )
        return reply

    def close(self) -> None:
        """Release the session lock, and the sequence of a temporary session; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self.session.last_used = time.time()
        if self._locked:
            self.session.lock.release()
            self._locked = False
        if self.temporary:
            self.service._discard(self.session)


def _import_error(exc: BaseException, model_name: str) -> BaseException:
    """Map an import failure to the HTTP error of the response (other exceptions pass through)."""
    if isinstance(exc, ModelMismatchError):
        return HTTPError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            f"the card was made by another model than this server's ({model_name}): {exc}",
            "model_mismatch",
        )
    if isinstance(exc, ContextTooSmallError):
        return HTTPError(
            HTTPStatus.INSUFFICIENT_STORAGE, f"{exc} (this is the server's n_ctx per session)", "context_full"
        )
    if isinstance(exc, ImportFailedError):
        return HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc), "import_failed")
    if isinstance(exc, (QKVShareError, ValueError)):
        return HTTPError(HTTPStatus.BAD_REQUEST, f"card rejected: {exc}", "invalid_card")
    return exc


# -- request parsing ------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")


def _parse_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "'messages' must be a non-empty list of {role, content} objects")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"messages[{index}] must be an object, got {message!r}")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in _ROLES:
            raise HTTPError(
                HTTPStatus.BAD_REQUEST, f"messages[{index}].role {role!r} is not supported; use one of {_ROLES}"
            )
        content = message.get("content")
        if isinstance(content, list):
            # OpenAI content parts: only text parts are supported.
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise HTTPError(
                        HTTPStatus.BAD_REQUEST, f"messages[{index}].content has a part that is not text: {part!r}"
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"messages[{index}].content must be a string, got {content!r}")
        messages.append({"role": role, "content": content})
    return messages


def _new_messages(history: list[dict[str, str]], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Return the messages that a session has not seen.

    A client may send the whole conversation each time (the OpenAI habit) or
    only the new messages: when the session's history is a prefix of the
    request, only the rest is new, and otherwise all of it is.
    """
    if history and messages[: len(history)] == history:
        return messages[len(history) :]
    return messages


def _apply_messages(chat: ChatSession, messages: list[dict[str, str]]) -> None:
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            chat.preamble += content + "\n\n"
        elif role == "user":
            following = messages[index + 1]["role"] if index + 1 < len(messages) else None
            chat.add_user(content, open_reply=following in (None, "assistant"))
        else:
            chat.add_assistant(content)


def _optional_int(request: dict[str, Any], key: str, low: int) -> int | None:
    value = request.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"'{key}' must be an integer >= {low}, got {value!r}")
    return value


def _optional_number(request: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = request.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"'{key}' must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


# -- HTTP ---------------------------------------------------------------------------


class AgentHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that serves one `AgentService`."""

    daemon_threads = True

    def __init__(self, service: AgentService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.service = service
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: AgentHTTPServer
    protocol_version = "HTTP/1.0"
    timeout = READ_TIMEOUT_S
    server_version = "qkvedge-serve"

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- routing

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = [p for p in url.path.split("/") if p]
        service = self.server.service
        try:
            if parts == ["health"]:
                self._allow(method, "GET")
                self._send_json(HTTPStatus.OK, service.health())
            elif parts == ["v1", "models"]:
                self._allow(method, "GET")
                model = {
                    "id": service.model_name,
                    "object": "model",
                    "owned_by": "qkvedge",
                    "agent": service.config.name,
                }
                self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
            elif parts == ["v1", "cards"]:
                self._allow(method, "POST")
                data = self._read_body(service.max_card_bytes, "card")
                note = query.get("note", [""])[0]
                self._send_json(HTTPStatus.CREATED, service.import_card(data, note=note))
            elif parts == ["v1", "chat", "completions"]:
                self._allow(method, "POST")
                self._chat_completions()
            elif parts == ["v1", "sessions"]:
                self._allow(method, "GET")
                self._send_json(HTTPStatus.OK, {"sessions": service.list_sessions()})
            elif len(parts) == 3 and parts[:2] == ["v1", "sessions"]:
                self._allow(method, "GET", "DELETE")
                if method == "GET":
                    self._send_json(HTTPStatus.OK, service.session_info(parts[2]))
                else:
                    service.delete_session(parts[2])
                    self._send_json(HTTPStatus.OK, {"deleted": parts[2]})
            elif len(parts) == 4 and parts[:2] == ["v1", "sessions"] and parts[3] == "card":
                self._allow(method, "GET")
                self._send_card(parts[2], query)
            else:
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no endpoint {url.path}; see GET /health", "not_found")
        except HTTPError as exc:
            level = logging.ERROR if exc.status >= 500 else logging.WARNING
            logger.log(level, "%s %s -> %d: %s", method, url.path, exc.status, exc.message)
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError) as exc:
            logger.warning("%s %s: the client closed the connection (%s)", method, url.path, exc)
        except Exception as exc:
            logger.exception("%s %s failed", method, url.path)
            self._send_error(HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}", "server_error"))

    def _allow(self, method: str, *allowed: str) -> None:
        if method not in allowed:
            raise HTTPError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{method} is not allowed on {urllib.parse.urlsplit(self.path).path}; use {' or '.join(allowed)}",
            )

    # -- endpoints

    def _chat_completions(self) -> None:
        body = self._read_body(MAX_JSON_BYTES, "JSON request")
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(request, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        run = self.server.service.start_chat(request)
        # The run is closed before the last bytes go out, so a client that sends its next request as soon as
        # it has read the reply finds the session free.
        try:
            if run.stream:
                self._stream_reply(run)
            else:
                reply = run.generate()
                completion = _completion(run, reply, f"chatcmpl-{secrets.token_hex(8)}")
                run.close()
                self._send_json(HTTPStatus.OK, completion)
        finally:
            run.close()

    def _stream_reply(self, run: ChatRun) -> None:
        completion_id = f"chatcmpl-{secrets.token_hex(8)}"
        created = int(time.time())
        model = self.server.service.model_name
        disconnected = threading.Event()

        def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            try:
                self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()
            except OSError as exc:
                if not disconnected.is_set():
                    logger.warning("session %s: the client closed the stream (%s)", run.session.session_id, exc)
                disconnected.set()

        def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "session_id": run.session_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        send(chunk({"role": "assistant", "content": ""}))
        try:
            reply = run.generate(on_text=lambda text: send(chunk({"content": text})), should_stop=disconnected.is_set)
        except HTTPError as exc:
            logger.warning("session %s: %s", run.session.session_id, exc.message)
            send({"error": {"message": exc.message, "type": exc.error_type, "code": int(exc.status)}})
            return
        except Exception as exc:
            logger.exception("session %s: generation failed", run.session.session_id)
            send({"error": {"message": f"generation failed: {exc}", "type": "server_error", "code": 500}})
            return
        final = chunk({}, _finish_reason(reply))
        final.update(_usage(run, reply))
        run.close()
        send(final)
        send("[DONE]")

    def _send_card(self, session_id: str, query: dict[str, list[str]]) -> None:
        budget_text = query.get("budget", [None])[0]
        try:
            budget = float(budget_text) if budget_text is not None else None
        except ValueError as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"budget {budget_text!r} is not a number") from exc
        data, card = self.server.service.export_card(
            session_id, budget=budget, controller=query.get("controller", [None])[0]
        )
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Card-Tokens", str(card.n_tokens))
        self.send_header("X-Card-Sha256", card.sha256)
        self.end_headers()
        self.wfile.write(data)

    # -- bodies

    def _read_body(self, limit: int, what: str) -> bytes:
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise HTTPError(
                HTTPStatus.LENGTH_REQUIRED,
                f"the {what} body needs a Content-Length header (chunked upload is not supported)",
            )
        try:
            length = int(length_text)
        except ValueError as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {length_text!r}") from exc
        if length < 0:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {length_text!r}")
        if length > limit:
            # The connection closes after this answer, so the unread body is dropped.
            raise HTTPError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the {what} has {length:,} bytes, more than this server's limit of {limit:,}; "
                "use a smaller budget or raise the limit (qkvedge serve --max-card-mb)",
                "too_large",
            )
        data = self.rfile.read(length)
        if len(data) != length:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the {what} body ended after {len(data)} of {length} bytes")
        return data

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, exc: HTTPError) -> None:
        payload = {"error": {"message": exc.message, "type": exc.error_type, "code": int(exc.status)}}
        try:
            self._send_json(exc.status, payload)
        except OSError as write_error:
            logger.warning("could not send the %d response: %s", exc.status, write_error)


def _finish_reason(reply: Reply) -> str:
    return "length" if reply.finish_reason == "length" else "stop"


def _usage(run: ChatRun, reply: Reply) -> dict[str, Any]:
    prompt = reply.prompt_tokens + reply.cached_tokens
    return {
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": reply.n_tokens,
            "total_tokens": prompt + reply.n_tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
        },
        "session": {"n_tokens": len(run.session.chat.tokens), "n_ctx": run.session.chat.n_ctx},
        "timings": {"ttft_ms": round(reply.ttft_ms, 2), "total_ms": round(reply.total_ms, 2)},
    }


def _completion(run: ChatRun, reply: Reply, completion_id: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": run.service.model_name,
        "session_id": run.session_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": _finish_reason(reply),
            }
        ],
        **_usage(run, reply),
    }


def start_server(service: AgentService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> AgentHTTPServer:
    """Bind the server (port 0 picks a free port) and serve it from a daemon thread; stop it with `stop_server`."""
    server = AgentHTTPServer(service, host, port)
    thread = threading.Thread(target=server.serve_forever, name="qkvedge-serve", daemon=True)
    thread.start()
    logger.info("serving agent %s on %s", service.config.name, server.url)
    return server


def stop_server(server: AgentHTTPServer) -> None:
    """Stop serving, close the socket and free the model."""
    server.shutdown()
    server.server_close()
    server.service.close()
    logger.info("stopped serving agent %s on %s", server.service.config.name, server.url)


# -- client -----------------------------------------------------------------------


class AgentServerError(QKVShareError, RuntimeError):
    """A `qkvedge serve` answered an error, or could not be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class AgentClient:
    """A client of `qkvedge serve`: hand it cards, chat with its sessions, fetch cards back."""

    def __init__(self, url: str, *, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _open(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise AgentServerError(
                f"{self.url}: {method} {path} failed with {exc.code}: {_error_text(exc)}", exc.code
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AgentServerError(
                f"cannot reach {self.url} ({reason}); start the agent with `qkvedge serve` or check the URL"
            ) from exc

    def _json(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps(payload).encode() if payload is not None else None
        with self._open(method, path, body, "application/json" if body is not None else "") as response:
            return json.loads(response.read())

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def post_card(self, data: bytes, *, note: str = "") -> dict[str, Any]:
        path = "/v1/cards" + (f"?note={urllib.parse.quote(note)}" if note else "")
        with self._open("POST", path, data, "application/octet-stream") as response:
            return json.loads(response.read())

    def fetch_card(self, session_id: str, *, budget: float, controller: str) -> CacheCard:
        query = urllib.parse.urlencode({"budget": f"{budget:g}", "controller": controller})
        with self._open("GET", f"/v1/sessions/{urllib.parse.quote(session_id)}/card?{query}") as response:
            return CacheCard.from_bytes(response.read())

    def delete_session(self, session_id: str) -> None:
        self._json("DELETE", f"/v1/sessions/{urllib.parse.quote(session_id)}")

    def session_info(self, session_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/sessions/{urllib.parse.quote(session_id)}")

    def chat(
        self,
        session_id: str | None,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        on_text: TextCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[Reply, int | None]:
        """Send messages and stream the reply; return it and the session's context size in tokens.

        When `should_stop` returns True the stream is closed, which stops the
        server's generation, and the context size is None (unknown).
        """
        payload: dict[str, Any] = {"messages": messages, "stream": True}
        if session_id is not None:
            payload["session_id"] = session_id
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        start = time.perf_counter()
        ttft_ms = 0.0
        parts: list[str] = []
        final: dict[str, Any] = {}
        stopped = False
        with self._open("POST", "/v1/chat/completions", json.dumps(payload).encode(), "application/json") as response:
            for event in _server_sent_events(response):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                if event == "[DONE]":
                    break
                data = json.loads(event)
                if "error" in data:
                    error = data["error"]
                    raise AgentServerError(f"{self.url}: {error.get('message')}", int(error.get("code", 0)))
                choice = data["choices"][0]
                text = choice["delta"].get("content", "")
                if text:
                    if not parts:
                        ttft_ms = (time.perf_counter() - start) * 1e3
                    parts.append(text)
                    if on_text is not None:
                        on_text(text)
                if choice.get("finish_reason") is not None:
                    final = data
        if stopped:
            elapsed_ms = (time.perf_counter() - start) * 1e3
            reply = Reply("".join(parts), len(parts), "interrupted", 0, 0, ttft_ms, elapsed_ms)
            return reply, None
        if not final:
            raise AgentServerError(f"{self.url}: the reply stream ended without a final chunk")
        usage, timings = final["usage"], final["timings"]
        reply = Reply(
            text="".join(parts),
            n_tokens=int(usage["completion_tokens"]),
            finish_reason=final["choices"][0]["finish_reason"],
            prompt_tokens=int(usage["prompt_tokens"]) - int(usage["prompt_tokens_details"]["cached_tokens"]),
            cached_tokens=int(usage["prompt_tokens_details"]["cached_tokens"]),
            ttft_ms=ttft_ms or float(timings["ttft_ms"]),
            total_ms=(time.perf_counter() - start) * 1e3,
        )
        return reply, int(final["session"]["n_tokens"])


def _server_sent_events(response: Any) -> Iterator[str]:
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("data: "):
            yield line[len("data: ") :]


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)
