"""Tests of `qkvedge serve` through real HTTP on 127.0.0.1: cards in, chat completions, errors, and two processes."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PARAGRAPH

import qkvshare_edge
from qkvshare_edge import CacheCard
from qkvshare_edge.agents import load_agents
from qkvshare_edge.chat import AgentPool, LocalAgent
from qkvshare_edge.server import AgentClient, AgentHTTPServer, AgentServerError, AgentService, start_server, stop_server

QUESTION = "When does the ferry leave?"
OTHER_TEXT = "The library opens at nine and closes at noon on Saturdays, when the reading room is quiet. "
MAX_CARD_BYTES = 1 << 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def agents_path(folder: Path, llama_path: Path, llama_seed1_path: Path) -> Path:
    """Agents on the seed-0 tiny llama (sender, server) and on the seed-1 one (stranger)."""
    path = folder / "agents.toml"
    path.write_text(
        f"""
[defaults]
model = "{llama_path}"
n_ctx = 512
threads = 2
flash_attn = true
max_tokens = 8

[agents.sender]
n_ctx = 2048
[agents.peer]
[agents.server]
[agents.small]
n_ctx = 256
[agents.stranger]
model = "{llama_seed1_path}"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def server(agents_path: Path) -> Iterator[AgentHTTPServer]:
    config = load_agents(agents_path).get("server")
    service = AgentService(config, max_sessions=2, max_card_bytes=MAX_CARD_BYTES, threads=2)
    running = start_server(service, "127.0.0.1", 0)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def pool(agents_path: Path) -> Iterator[AgentPool]:
    agents = AgentPool(load_agents(agents_path))
    yield agents
    agents.close()


@pytest.fixture(autouse=True)
def no_sessions_left(server: AgentHTTPServer) -> Iterator[None]:
    """Each test starts and ends with no server sessions, so the two slots are free."""
    yield
    for info in server.service.list_sessions():
        server.service.delete_session(info["session_id"])


def make_card(pool: AgentPool, agent: str, text: str, *, budget: float = 16.0, question: str | None = None) -> bytes:
    """Have a local agent read `text` (and answer `question`), and return its context as card bytes."""
    sender = pool.get(agent)
    assert isinstance(sender, LocalAgent)
    sender.session.clear()
    sender.add_document("notes.txt", text)
    if question is not None:
        sender.ask(question)
    return sender.export_card(budget=budget, controller="uniform").to_bytes()


def request(
    server: AgentHTTPServer, method: str, path: str, body: bytes | dict[str, Any] | None = None
) -> tuple[int, dict[str, Any] | bytes]:
    """Send one HTTP request; return the status and the JSON (or raw) body, for success and error responses alike."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(server.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, json.loads(raw) if kind == "application/json" else raw


def post_card(server: AgentHTTPServer, data: bytes) -> str:
    status, body = request(server, "POST", "/v1/cards", data)
    assert status == 201, body
    assert isinstance(body, dict)
    return str(body["session_id"])


def chat(server: AgentHTTPServer, session_id: str | None, content: str, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": content}], **extra}
    if session_id is not None:
        payload["session_id"] = session_id
    status, body = request(server, "POST", "/v1/chat/completions", payload)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def error_of(body: dict[str, Any] | bytes) -> str:
    assert isinstance(body, dict), body
    return str(body["error"]["message"])


# -- endpoints --------------------------------------------------------------------------


def test_health_and_models(server: AgentHTTPServer) -> None:
    status, body = request(server, "GET", "/health")
    assert status == 200
    assert isinstance(body, dict)
    assert body["status"] == "ok"
    assert body["agent"] == "server"
    assert body["max_sessions"] == 2
    assert body["chat_format"] == "plain"
    status, models = request(server, "GET", "/v1/models")
    assert status == 200
    assert isinstance(models, dict)
    assert models["data"][0]["id"] == body["model"]


def test_card_session_continues_without_reprefill(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", PARAGRAPH)
    status, created = request(server, "POST", "/v1/cards", data)
    assert status == 201
    assert isinstance(created, dict)
    n_tokens = created["n_tokens"]
    assert created["n_ctx"] == 512
    assert created["hop"] == 1
    assert created["card_bytes"] == len(data)

    reply = chat(server, created["session_id"], QUESTION)
    assert reply["object"] == "chat.completion"
    assert reply["session_id"] == created["session_id"]
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert usage["completion_tokens"] > 0
    # The card's tokens are reused; only the question (and the last card token) is decoded.
    assert usage["prompt_tokens_details"]["cached_tokens"] >= n_tokens - 1
    assert usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] < n_tokens // 4
    assert reply["session"]["n_tokens"] > n_tokens


def test_lossless_card_replies_like_sender(server: AgentHTTPServer, pool: AgentPool) -> None:
    # The peer's context has as many cells as a server session, so both decode with the same numerics.
    data = make_card(pool, "peer", PARAGRAPH, question="What is this about?")
    session_id = post_card(server, data)
    remote = chat(server, session_id, QUESTION)["choices"][0]["message"]["content"]
    sender = pool.get("peer")
    local = sender.ask(QUESTION).text
    assert remote == local


def test_stream_matches_plain_reply(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", PARAGRAPH)
    plain = chat(server, post_card(server, data), QUESTION)
    streamed: list[str] = []
    reply, n_context = AgentClient(server.url).chat(
        post_card(server, data), [{"role": "user", "content": QUESTION}], on_text=streamed.append
    )
    assert reply.text == plain["choices"][0]["message"]["content"]
    assert "".join(streamed) == reply.text
    assert reply.n_tokens == plain["usage"]["completion_tokens"]
    assert n_context == plain["session"]["n_tokens"]


def test_client_stops_stream(server: AgentHTTPServer, pool: AgentPool) -> None:
    session_id = post_card(server, make_card(pool, "sender", PARAGRAPH))
    reply, n_context = AgentClient(server.url).chat(
        session_id, [{"role": "user", "content": QUESTION}], should_stop=lambda: True
    )
    assert reply.finish_reason == "interrupted"
    assert n_context is None
    # The server notices the closed stream at its next write, then frees the session.
    for _ in range(100):
        status, _ = request(
            server,
            "POST",
            "/v1/chat/completions",
            {"session_id": session_id, "messages": [{"role": "user", "content": "Again?"}]},
        )
        if status != 409:
            break
        time.sleep(0.1)
    assert status == 200


def test_sessions_do_not_mix(server: AgentHTTPServer, pool: AgentPool) -> None:
    ferry = make_card(pool, "sender", PARAGRAPH)
    library = make_card(pool, "sender", OTHER_TEXT * 3)
    expected = {}
    for name, data in (("ferry", ferry), ("library", library)):
        session_id = post_card(server, data)
        expected[name] = chat(server, session_id, QUESTION, max_tokens=12)["choices"][0]["message"]["content"]
        server.service.delete_session(session_id)
    assert expected["ferry"] != expected["library"]

    sessions = {"ferry": post_card(server, ferry), "library": post_card(server, library)}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
        futures = {
            name: executor.submit(chat, server, session_id, QUESTION, max_tokens=12)
            for name, session_id in sessions.items()
        }
        got = {name: future.result()["choices"][0]["message"]["content"] for name, future in futures.items()}
    assert got == expected


def test_resent_history_only_adds_new_messages(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", PARAGRAPH)
    first_id, second_id = post_card(server, data), post_card(server, data)
    answer = chat(server, first_id, "Hello.")["choices"][0]["message"]["content"]
    chat(server, second_id, "Hello.")

    history = [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": QUESTION},
    ]
    status, full = request(server, "POST", "/v1/chat/completions", {"session_id": first_id, "messages": history})
    assert status == 200
    assert isinstance(full, dict)
    only_new = chat(server, second_id, QUESTION)
    assert full["choices"][0]["message"]["content"] == only_new["choices"][0]["message"]["content"]
    assert full["usage"] == only_new["usage"]


def test_session_card_is_next_hop(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", PARAGRAPH)
    session_id = post_card(server, data)
    chat(server, session_id, QUESTION)
    status, raw = request(server, "GET", f"/v1/sessions/{session_id}/card?budget=8&controller=key-norm")
    assert status == 200
    assert isinstance(raw, bytes)
    card = CacheCard.from_bytes(raw)
    assert card.provenance.hop == 2
    assert card.provenance.parent_sha256 == CacheCard.from_bytes(data).sha256
    assert card.provenance.controller == "key-norm"
    status, info = request(server, "GET", f"/v1/sessions/{session_id}")
    assert status == 200
    assert isinstance(info, dict)
    assert card.n_tokens == info["n_tokens"]


def test_stateless_request(server: AgentHTTPServer) -> None:
    body = chat(server, None, QUESTION, max_tokens=4)
    assert body["session_id"] is None
    assert body["usage"]["completion_tokens"] > 0
    assert server.service.list_sessions() == []


# -- errors -------------------------------------------------------------------------------


def test_corrupt_card_is_400(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", PARAGRAPH)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    for body, expected in (
        (b"not a card at all", "invalid card"),
        (data[: len(data) // 2], "invalid card"),
        (bytes(flipped), "invalid card"),
        (b"", "card is empty"),
    ):
        status, answer = request(server, "POST", "/v1/cards", body)
        assert status == 400, answer
        assert expected in error_of(answer)
    assert server.service.list_sessions() == []


def test_wrong_model_card_is_422(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "stranger", PARAGRAPH, budget=4.0)
    status, answer = request(server, "POST", "/v1/cards", data)
    assert status == 422
    message = error_of(answer)
    assert "another model" in message
    assert "weights sha256" in message
    assert isinstance(answer, dict) and answer["error"]["type"] == "model_mismatch"
    assert server.service.list_sessions() == []


def test_too_large_card_is_413(server: AgentHTTPServer) -> None:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(str(host), int(port), timeout=30)
    try:
        connection.putrequest("POST", "/v1/cards")
        connection.putheader("Content-Length", str(MAX_CARD_BYTES + 1))
        connection.endheaders()
        connection.send(b"GGUF")
        response = connection.getresponse()
        assert response.status == 413
        assert "more than this server's limit" in json.loads(response.read())["error"]["message"]
    finally:
        connection.close()


def test_card_larger_than_session_is_507(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", PARAGRAPH * 5, budget=4.0)
    assert CacheCard.from_bytes(data).n_tokens > 512
    status, answer = request(server, "POST", "/v1/cards", data)
    assert status == 507
    assert "n_ctx" in error_of(answer)


def test_full_context_is_507(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", PARAGRAPH * 2, budget=4.0)
    session_id = post_card(server, data)
    before = request(server, "GET", f"/v1/sessions/{session_id}")[1]
    payload = {"session_id": session_id, "messages": [{"role": "user", "content": PARAGRAPH * 2}]}
    status, answer = request(server, "POST", "/v1/chat/completions", payload)
    assert status == 507
    assert "room for" in error_of(answer)
    # The rejected message left the session as it was.
    assert request(server, "GET", f"/v1/sessions/{session_id}")[1] == before


def test_too_many_sessions_is_503(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", PARAGRAPH)
    first, _ = post_card(server, data), post_card(server, data)
    status, answer = request(server, "POST", "/v1/cards", data)
    assert status == 503
    assert "session slots are in use" in error_of(answer)
    status, _ = request(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 503
    assert request(server, "DELETE", f"/v1/sessions/{first}")[0] == 200
    post_card(server, data)


def test_idle_sessions_make_room(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", PARAGRAPH)
    first, second = post_card(server, data), post_card(server, data)
    ttl = server.service.session_ttl_s
    server.service.session_ttl_s = 0.05
    try:
        time.sleep(0.1)
        third = post_card(server, data)
    finally:
        server.service.session_ttl_s = ttl
    sessions = {info["session_id"] for info in server.service.list_sessions()}
    assert first not in sessions
    assert second not in sessions
    assert third in sessions
    status, answer = request(server, "GET", f"/v1/sessions/{first}")
    assert status == 404
    assert "idle" in error_of(answer)


def test_card_note_opens_first_message(server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", PARAGRAPH)
    status, created = request(server, "POST", "/v1/cards?note=Answer%20in%20one%20word.", data)
    assert status == 201
    assert isinstance(created, dict)
    session = server.service._get(created["session_id"])
    assert session.chat.preamble == "Answer in one word.\n\n"
    chat(server, created["session_id"], QUESTION)
    assert session.chat.preamble == ""
    text = server.service.llm.detokenize(session.chat.tokens[created["n_tokens"] :]).decode(errors="replace")
    assert "Answer in one word.\n\nWhen does the ferry leave?" in text


def test_request_errors(server: AgentHTTPServer, pool: AgentPool) -> None:
    session_id = post_card(server, make_card(pool, "sender", PARAGRAPH))
    cases: list[tuple[str, str, bytes | dict[str, Any] | None, int, str]] = [
        ("GET", "/nowhere", None, 404, "no endpoint"),
        ("GET", "/v1/cards", None, 405, "use POST"),
        ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/chat/completions", {"messages": []}, 400, "'messages'"),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role 'tool'"),
        (
            "POST",
            "/v1/chat/completions",
            {"session_id": "sess-missing", "messages": [{"role": "user", "content": "x"}]},
            404,
            "no session 'sess-missing'",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"session_id": session_id, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "'max_tokens'",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"session_id": session_id, "messages": [{"role": "assistant", "content": "x"}]},
            400,
            "role 'user'",
        ),
        ("GET", f"/v1/sessions/{session_id}/card?budget=40", None, 400, "out of range"),
        ("GET", f"/v1/sessions/{session_id}/card?controller=best", None, 400, "unknown controller"),
        ("DELETE", "/v1/sessions/sess-missing", None, 404, "no session"),
    ]
    for method, path, body, expected_status, expected_text in cases:
        status, answer = request(server, method, path, body)
        assert status == expected_status, (method, path, answer)
        assert expected_text in error_of(answer), (method, path, answer)


def test_busy_session_is_409(server: AgentHTTPServer, pool: AgentPool) -> None:
    session_id = post_card(server, make_card(pool, "sender", PARAGRAPH))
    session = server.service._get(session_id)
    with session.lock:
        status, answer = request(
            server,
            "POST",
            "/v1/chat/completions",
            {"session_id": session_id, "messages": [{"role": "user", "content": "x"}]},
        )
    assert status == 409
    assert "busy" in error_of(answer)
    assert chat(server, session_id, QUESTION)["usage"]["completion_tokens"] > 0


def test_client_reports_unreachable_server() -> None:
    with pytest.raises(AgentServerError, match=r"cannot reach http://127\.0\.0\.1:9"):
        AgentClient("http://127.0.0.1:9", timeout_s=5).health()


# -- two processes ------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    """Environment for child processes that import the same qkvshare_edge as this test run."""
    env = dict(os.environ)
    root = str(Path(qkvshare_edge.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def test_handoff_between_processes(agents_path: Path, folder: Path) -> None:
    notes = folder / "notes.txt"
    notes.write_text(PARAGRAPH * 2, encoding="utf-8")
    command = [sys.executable, "-m", "qkvshare_edge.cli"]
    serve = subprocess.Popen(
        [*command, "serve", "--agents", str(agents_path), "--agent", "server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=folder,
    )
    try:
        assert serve.stdout is not None
        ready, _, _ = select.select([serve.stdout], [], [], 60)
        assert ready, "qkvedge serve printed no address within 60 s"
        banner = serve.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", banner)
        assert match, banner
        url = match.group(1)

        chat_run = subprocess.run(
            [
                *(*command, "chat", "--agents", str(agents_path), "--agent", "sender"),
                *("--prompt-file", str(notes), "--handoff-to", url, "--ask", QUESTION, "--json"),
            ],
            capture_output=True,
            text=True,
            env=cli_env(),
            cwd=folder,
            timeout=120,
        )
        assert chat_run.returncode == 0, chat_run.stderr
        payload = json.loads(chat_run.stdout.strip().splitlines()[-1])
        assert payload["handoff"]["to"].startswith("server@127.0.0.1:")
        assert payload["handoff"]["card_bytes"] > 0
        assert payload["reply_tokens"] > 0
        # The chat deletes its remote session when it ends.
        health = AgentClient(url).health()
        assert health["sessions"] == 0
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            _, errors = serve.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            _, errors = serve.communicate()
    assert serve.returncode == 0, errors
    assert "imported card" in errors
    assert "stopped serving agent server" in errors


SIGNING_KEY = b"shared-key-for-the-server-tests-0123"


@pytest.fixture
def signed_server(agents_path: Path) -> Iterator[AgentHTTPServer]:
    config = load_agents(agents_path).get("server")
    service = AgentService(
        config, max_sessions=1, max_card_bytes=MAX_CARD_BYTES, threads=2, card_key=SIGNING_KEY, require_signed=True
    )
    running = start_server(service, "127.0.0.1", 0)
    yield running
    stop_server(running)


def test_unsigned_card_is_403(signed_server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", "The tap near the gate is turned on in April.")
    status, body = request(signed_server, "POST", "/v1/cards", data)
    assert status == 403
    assert "not signed" in error_of(body)


def test_wrong_key_card_is_403(signed_server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", "The tap near the gate is turned on in April.")
    signed = CacheCard.from_bytes(data).to_bytes(key=b"a-different-key-0123456789")
    status, body = request(signed_server, "POST", "/v1/cards", signed)
    assert status == 403
    assert "does not verify" in error_of(body)


def test_signed_card_is_accepted(signed_server: AgentHTTPServer, pool: AgentPool) -> None:
    data = make_card(pool, "sender", "The tap near the gate is turned on in April.")
    signed = CacheCard.from_bytes(data).to_bytes(key=SIGNING_KEY)
    status, body = request(signed_server, "POST", "/v1/cards", signed)
    assert status == 201, body


def test_require_signed_needs_key(agents_path: Path) -> None:
    config = load_agents(agents_path).get("server")
    with pytest.raises(ValueError, match="shared key"):
        AgentService(config, max_sessions=1, require_signed=True)
