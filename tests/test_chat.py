"""Tests of chat sessions, handoffs, the interactive chat on a pseudo-terminal, and card export/import."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from conftest import PARAGRAPH
from typer.testing import CliRunner

import qkvshare_edge
from qkvshare_edge import CacheCard, ModelMismatchError
from qkvshare_edge.agents import load_agents
from qkvshare_edge.chat import (
    PLAIN_FORMAT,
    PROGRESS_MIN_TOKENS,
    AgentPool,
    ChatRepl,
    ChatSession,
    ContextFullError,
    LocalAgent,
    ProgressBar,
    SamplingSettings,
    _StopScanner,
    format_from_template,
    hand_off,
    sample_token,
)
from qkvshare_edge.cli import app

LOSSLESS = 16.0
QUESTION = "When does the ferry leave?"

GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('no system role') }}{% endif %}[{{ message['role'] }}] {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def agents_path(tmp_path_factory: pytest.TempPathFactory, llama_path: Path, llama_seed1_path: Path) -> Path:
    """Agents a and c share a system prompt; b has its own; other runs a model with other weights."""
    folder = tmp_path_factory.mktemp("chat")
    (folder / "notes.txt").write_text(PARAGRAPH * 3, encoding="utf-8")
    path = folder / "agents.toml"
    path.write_text(
        f"""
[defaults]
model = "{llama_path}"
n_ctx = 1024
threads = 2
flash_attn = true
max_tokens = 8
system = "You read the ferry notes."

[agents.a]
handoff_to = "b"

[agents.b]
system = "You answer questions about the notes."

[agents.c]

[agents.other]
model = "{llama_seed1_path}"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def pool(agents_path: Path) -> Iterator[AgentPool]:
    agents = AgentPool(load_agents(agents_path))
    yield agents
    agents.close()


def local(pool: AgentPool, name: str) -> LocalAgent:
    agent = pool.get(name)
    assert isinstance(agent, LocalAgent)
    return agent


# -- prompt format ------------------------------------------------------------------


def test_template_format_gemma_like() -> None:
    fmt = format_from_template(GEMMA_LIKE_TEMPLATE, "<bos>", "<eos>")
    assert fmt.name == "template"
    assert fmt.bos_in_template
    assert fmt.head == "<start_of_turn>user\n"
    assert fmt.system_head == ("<start_of_turn>user\n", "\n\n")
    assert fmt.user_separator == "<end_of_turn>\n<start_of_turn>user\n"
    assert fmt.assistant_prompt == "<end_of_turn>\n<start_of_turn>model\n"


def test_template_format_chatml() -> None:
    fmt = format_from_template(CHATML_TEMPLATE, "<s>", "</s>")
    assert not fmt.bos_in_template
    assert fmt.head == "<|im_start|>user\n"
    assert fmt.system_head == ("<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n")
    assert fmt.user_separator == "<|im_end|>\n<|im_start|>user\n"
    assert fmt.assistant_prompt == "<|im_end|>\n<|im_start|>assistant\n"


def test_template_without_system_role() -> None:
    fmt = format_from_template(NO_SYSTEM_TEMPLATE, "<s>", "</s>")
    assert fmt.system_head is None
    segments, prefix = fmt.head_segments("Be brief.")
    assert segments == [("[user] ", True)]
    assert prefix == "Be brief.\n\n"


@pytest.mark.parametrize(
    "template",
    ["{{ raise_exception('never') }}", "{% for m in messages %}{{ m['content'] | lower }}{% endfor %}", "{{ x"],
    ids=["raises", "not-verbatim", "syntax-error"],
)
def test_unusable_template_raises(template: str) -> None:
    with pytest.raises(ValueError, match="chat template"):
        format_from_template(template, "<s>", "</s>")


def test_plain_format_head() -> None:
    assert PLAIN_FORMAT.head_segments("") == ([("Question: ", True)], "")
    segments, prefix = PLAIN_FORMAT.head_segments("Be brief.")
    assert segments == [("", True), ("Be brief.", False), ("\n\nQuestion: ", True)]
    assert prefix == ""


# -- sampling and stop strings --------------------------------------------------------


def test_stop_scanner_holds_partial_stop() -> None:
    scanner = _StopScanner(["\nUser:"])
    assert scanner.feed("It leaves at seven.\nUs") == ("It leaves at seven.", False)
    assert scanner.feed("er: next") == ("", True)
    assert scanner.emitted == "It leaves at seven."


def test_stop_scanner_releases_false_alarm() -> None:
    scanner = _StopScanner(["\nUser:"])
    assert scanner.feed("a\nU") == ("a", False)
    assert scanner.feed("nder") == ("\nUnder", False)
    assert scanner.flush() == ""


def test_sample_token_greedy_and_penalty() -> None:
    logits = np.array([1.0, 3.0, 2.9, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    greedy = SamplingSettings(temperature=0.0, repeat_penalty=1.0)
    assert sample_token(logits, greedy, rng) == 1
    penalized = SamplingSettings(temperature=0.0, repeat_penalty=1.5)
    assert sample_token(logits, penalized, rng, recent=[1]) == 2


def test_sample_token_seeded_and_top_k() -> None:
    logits = np.random.default_rng(1).normal(size=100).astype(np.float32)
    settings = SamplingSettings(temperature=1.0, top_k=10, top_p=0.9, repeat_penalty=1.0)
    first = [sample_token(logits, settings, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(first)) == 1
    top10 = set(np.argsort(-logits)[:10].tolist())
    rng = np.random.default_rng(3)
    assert all(sample_token(logits, settings, rng) in top10 for _ in range(50))
    one = SamplingSettings(temperature=1.0, top_k=1, repeat_penalty=1.0)
    assert sample_token(logits, one, rng) == int(np.argmax(logits))


# -- sessions -------------------------------------------------------------------------


def test_session_decodes_only_new_tokens(pool: AgentPool) -> None:
    session = local(pool, "a").session
    first = session.ask("Hello there.", max_tokens=6)
    assert first.cached_tokens == 0
    assert first.prompt_tokens > 0
    assert first.n_tokens > 0
    before = len(session.tokens)
    second = session.ask(QUESTION, max_tokens=6)
    added = second.prompt_tokens + second.cached_tokens - before
    assert added > 0
    # Only the new message (and at most the previous reply's last token) is decoded.
    assert second.prompt_tokens <= added + 1
    assert second.cached_tokens >= before - 1
    assert session.turns == 2


def test_session_matches_fresh_context(pool: AgentPool) -> None:
    """A reply after cached turns equals the reply of a fresh context that decodes the same tokens at once."""
    session = local(pool, "a").session
    session.ask("Hello there.", max_tokens=5)
    session.ask("And then?", max_tokens=5)
    session.add_user(QUESTION)
    prompt = list(session.tokens)
    incremental = session.generate(max_tokens=6)

    fresh = local(pool, "c").session
    fresh.tokens = list(prompt)
    fresh.state = "assistant"
    again = fresh.generate(max_tokens=6)
    assert again.prompt_tokens == len(prompt)
    assert again.text == incremental.text


def test_document_then_question_plain(pool: AgentPool) -> None:
    agent = local(pool, "a")
    n_tokens = agent.add_document("notes.txt", PARAGRAPH)
    assert n_tokens > 40
    assert agent.session.state == "context"
    assert agent.session.n_cached == len(agent.session.tokens)
    agent.ask(QUESTION)
    agent.ask("And then?")
    text = agent.llm.detokenize(agent.session.tokens).decode(errors="replace")
    assert text.startswith("You read the ferry notes.\n\nContents of notes.txt:\n\nEvery morning")
    # The tiny model's SentencePiece tokenizer puts a space at the start of each tokenizer call.
    assert re.search(r"his coat\. ?\n\nQuestion: When does the ferry leave\?\nAnswer:", text)
    assert text.count("Question:") == 2
    assert re.search(r" ?\nQuestion: And then\?\nAnswer:", text)


def test_document_joins_template_user_message(pool: AgentPool) -> None:
    agent = local(pool, "a")
    chatml = format_from_template(CHATML_TEMPLATE, "<s>", "</s>")
    session = ChatSession(agent.llm, chatml, SamplingSettings())
    session.add_document("notes.txt", PARAGRAPH)
    assert session.state == "user_open"
    session.ask(QUESTION, max_tokens=3)
    text = agent.llm.detokenize(session.tokens).decode(errors="replace")
    assert text.count("<|im_start|>user") == 1
    assert re.search(r"his coat\. ?\n\nWhen does the ferry leave\? ?<\|im_end\|>\n<\|im_start\|>assistant\n", text)


def test_context_full_keeps_session(pool: AgentPool) -> None:
    agent = local(pool, "a")
    agent.ask("Hello there.")
    before = list(agent.session.tokens)
    with pytest.raises(ContextFullError, match="n_ctx 1024"):
        agent.add_document("long.txt", PARAGRAPH * 20)
    assert agent.session.tokens == before
    assert agent.ask(QUESTION).n_tokens > 0


def test_long_file_reports_progress(pool: AgentPool) -> None:
    calls: list[tuple[int, int]] = []
    n_tokens = local(pool, "a").add_document("long.txt", PARAGRAPH * 5, lambda done, total: calls.append((done, total)))
    assert n_tokens > PROGRESS_MIN_TOKENS
    assert len(calls) >= 2
    assert calls[-1] == (n_tokens, n_tokens)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_terminal_only() -> None:
    terminal = FakeTerminal()
    bar = ProgressBar(terminal, "prefill notes.txt", width=10)
    bar(256, 1024)
    bar(1024, 1024)
    bar.close()
    output = terminal.getvalue()
    assert "\rprefill notes.txt [##--------] 256/1024 tokens" in output
    assert "[##########] 1024/1024 tokens" in output
    assert output.endswith("\r\x1b[K")
    plain = io.StringIO()
    ProgressBar(plain, "prefill")(1, 2)
    assert plain.getvalue() == ""


def test_checkpoint_and_rollback(pool: AgentPool) -> None:
    session = local(pool, "a").session
    session.ask("Hello there.", max_tokens=4)
    mark = session.checkpoint()
    tokens = list(session.tokens)
    session.add_user("This goes away.")
    session.generate(max_tokens=4)
    session.rollback(mark)
    assert session.tokens == tokens
    assert session.n_cached <= len(tokens)
    assert session.state == "assistant"


def test_template_session_writes_turn_markers(pool: AgentPool) -> None:
    agent = local(pool, "a")
    chatml = format_from_template(CHATML_TEMPLATE, "<s>", "</s>")
    session = ChatSession(agent.llm, chatml, SamplingSettings(), system="Be brief.")
    session.ask("First question?", max_tokens=3)
    session.ask("Second question?", max_tokens=3)
    text = agent.llm.detokenize(session.tokens).decode(errors="replace")
    markers = [m.start() for m in re.finditer(r"<\|im_start\|>", text)]
    assert len(markers) == 5  # system, user, assistant, user, assistant
    assert text.index("Be brief.") < text.index("First question?") < text.index("Second question?")


# -- handoff --------------------------------------------------------------------------


def test_lossless_handoff_continues_like_sender(pool: AgentPool) -> None:
    sender, receiver = local(pool, "a"), local(pool, "c")
    sender.add_document("notes.txt", PARAGRAPH)
    sender.ask("What is this about?")
    result = hand_off(sender, receiver, budget=LOSSLESS, controller="uniform")
    assert result.n_tokens == len(sender.session.tokens)
    assert result.card_bytes > 0
    assert result.hop == 1
    assert receiver.session.tokens == sender.session.tokens
    assert receiver.session.state == sender.session.state

    received = receiver.ask(QUESTION)
    expected = sender.ask(QUESTION)
    assert received.text == expected.text
    # The receiver decodes only the question, not the handed-off context.
    assert received.cached_tokens == result.n_tokens
    assert received.prompt_tokens < result.n_tokens // 4


def test_handoff_hops_record_parent(pool: AgentPool) -> None:
    first, second = local(pool, "a"), local(pool, "c")
    first.ask("Hello there.")
    one = hand_off(first, second, budget=8.0, controller="sink-recent")
    second.ask(QUESTION)
    two = hand_off(second, first, budget=8.0, controller="sink-recent")
    assert one.hop == 1
    assert two.hop == 2
    assert two.card is not None and one.card is not None
    assert two.card.provenance.parent_sha256 == one.card.sha256


def test_handoff_adds_receiver_system_prompt(pool: AgentPool) -> None:
    sender, receiver = local(pool, "a"), local(pool, "b")
    sender.ask("Hello there.")
    hand_off(sender, receiver, budget=8.0, controller="sink-recent")
    receiver.ask(QUESTION)
    text = receiver.llm.detokenize(receiver.session.tokens).decode(errors="replace")
    assert "You answer questions about the notes.\n\n" + QUESTION in text


def test_handoff_to_other_model_is_rejected(pool: AgentPool) -> None:
    sender, other = local(pool, "a"), local(pool, "other")
    sender.ask("Hello there.")
    with pytest.raises(ModelMismatchError, match="different model"):
        hand_off(sender, other, budget=4.0, controller="sink-recent")
    assert other.session.tokens == []


# -- the chat loop, driven in-process -----------------------------------------------------


def run_repl(pool: AgentPool, lines: list[str], **options: object) -> tuple[ChatRepl, str, str]:
    out, err = io.StringIO(), io.StringIO()
    queue = iter(lines)

    def read_line(prompt: str) -> str:
        out.write(prompt)
        try:
            return next(queue)
        except StopIteration:
            raise EOFError from None

    repl = ChatRepl(pool, "a", out=out, err=err, read_line=read_line, **options)  # type: ignore[arg-type]
    assert repl.run() == 0
    return repl, out.getvalue(), err.getvalue()


def test_repl_commands(pool: AgentPool, agents_path: Path, tmp_path: Path) -> None:
    notes = agents_path.parent / "notes.txt"
    card_path = tmp_path / "saved.qkvc"
    repl, out, err = run_repl(
        pool,
        [
            "/help",
            f"/load {notes}",
            "/budget 6 uniform",
            "/handoff b Is it early?",
            "/stats",
            f"/save {card_path}",
            "/agents",
            "/budget 99",
            "/handoff nobody-here and more",
            "/frobnicate",
            "/quit",
        ],
    )
    assert "/handoff [AGENT|URL] [MESSAGE]" in out
    assert re.search(r"loaded .*notes.txt: [\d,]+ tokens", out)
    assert "card budget 6 bits per element, controller uniform" in out
    assert re.search(r"handoff a -> b: [\d,]+ tokens \| card [\d,]+ bytes \| budget 6 \(uniform\)", out)
    assert re.search(r"TTFT \d+ ms", out)
    assert "b: " in out
    assert "handoffs:   1" in out
    assert "saved " in out
    assert CacheCard.load(card_path).provenance.hop == 2
    assert "* b " in out
    assert "budget 99 is out of range" in err
    assert "unknown command /frobnicate" in err
    # An unknown first word is part of the message to the default target; b hands off back to a.
    assert repl.agent.name == "a"
    assert len(repl.handoffs) == 2


def test_repl_handoff_after_turns(pool: AgentPool) -> None:
    repl, out, _ = run_repl(pool, ["Hello there.", QUESTION], handoff_after=1)
    assert len(repl.handoffs) == 1
    assert repl.agent.name == "b"
    assert out.index("handoff a -> b:") < out.index("\nb: ")
    assert out.index("a> a: ") < out.index("handoff a -> b:")


def test_repl_handoff_to_other_model_stays(pool: AgentPool) -> None:
    repl, out, err = run_repl(pool, ["Hello there.", "/handoff other", QUESTION])
    assert "different model" in err
    assert repl.agent.name == "a"
    assert len(re.findall(r"a> a: ", out)) == 2


# -- the chat on a pseudo-terminal ------------------------------------------------------


def cli_env() -> dict[str, str]:
    """Environment for child processes that import the same qkvshare_edge as this test run."""
    env = dict(os.environ)
    root = str(Path(qkvshare_edge.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["TERM"] = "dumb"
    return env


class Terminal:
    """A child process on a pseudo-terminal, typed at like a user at a keyboard."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.master, slave = pty.openpty()

        def take_terminal() -> None:
            # A new session with the terminal as its controlling terminal, so Ctrl-C sends SIGINT.
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # A shell without job control starts background jobs with SIGINT ignored, and
            # children inherit that, so pytest run that way would give a chat deaf to Ctrl-C.
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=cli_env(), preexec_fn=take_terminal
        )
        os.close(slave)
        self.output = ""
        self.position = 0

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self.position)
            if match:
                self.position = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; output:\n{self.output}")
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.5))
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO once the child has closed the terminal
                data = b""
            if not data:
                self.process.wait(timeout=10)
                raise AssertionError(
                    f"the process exited ({self.process.returncode}) before {pattern!r}; output:\n{self.output}"
                )
            self.output += data.decode("utf-8", errors="replace")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        try:
            return self.process.wait(timeout=20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            os.close(self.master)


def test_chat_on_terminal(agents_path: Path, tmp_path: Path) -> None:
    card_path = tmp_path / "from-terminal.qkvc"
    terminal = Terminal(
        [sys.executable, "-m", "qkvshare_edge.cli", "chat", "--agents", str(agents_path)], cwd=agents_path.parent
    )
    try:
        terminal.expect(r"chat with a \(")
        terminal.expect(r"a> ")
        terminal.send("/load notes.txt\n")
        terminal.expect(r"loaded notes.txt: [\d,]+ tokens")
        terminal.expect(r"a> ")
        terminal.send("What is this about?\n")
        terminal.expect(r"\na: ")
        terminal.expect(r"a> ")
        # Ctrl-C at the prompt leaves the chat running. The pause lets input() reach its wait for a key:
        # CPython's readline misses a SIGINT that arrives just before that wait until the next key.
        time.sleep(0.5)
        terminal.send("\x03")
        terminal.expect(r"a> ")
        terminal.send("/handoff\n")
        terminal.expect(r"now chatting with b ")
        terminal.expect(r"b> ")
        terminal.send(QUESTION + "\n")
        terminal.expect(r"handoff a -> b: [\d,]+ tokens \| card [\d,]+ bytes .*\| TTFT \d+ ms")
        terminal.expect(r"\nb: ")
        terminal.expect(r"b> ")
        terminal.send(f"/save {card_path}\n")
        terminal.expect(r"saved .*from-terminal.qkvc")
        terminal.expect(r"b> ")
        terminal.send("/stats\n")
        terminal.expect(r"handoffs:   1")
        terminal.expect(r"b> ")
        terminal.send("\x04")  # Ctrl-D leaves
        assert terminal.close() == 0
    finally:
        if terminal.process.poll() is None:
            terminal.close()
    assert CacheCard.load(card_path).n_tokens > 0


# -- non-interactive chat and card tools ------------------------------------------------


def test_chat_ask_json_hands_off(agents_path: Path) -> None:
    notes = agents_path.parent / "notes.txt"
    result = CliRunner().invoke(
        app,
        [
            "chat",
            "--agents",
            str(agents_path),
            "--agent",
            "a",
            "--prompt-file",
            str(notes),
            "--handoff-to",
            "b",
            "--ask",
            QUESTION,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["agent"] == "b"
    assert payload["reply_tokens"] > 0
    handoff = payload["handoff"]
    assert handoff["from"] == "a"
    assert handoff["to"] == "b"
    assert handoff["n_tokens"] > 40
    assert handoff["card_bytes"] > 0
    assert handoff["budget"] == 8.0
    assert handoff["ttft_ms"] > 0


def test_chat_ask_prints_answer_and_summary(agents_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            *("chat", "--agents", str(agents_path), "--prompt-file", str(agents_path.parent / "notes.txt")),
            *("--handoff-to", "c", "--ask", QUESTION),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    assert "handoff a -> c:" in result.stderr
    assert "handoff" not in result.stdout


def test_card_export_import_matches_reprefill(llama_path: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PARAGRAPH * 2, encoding="utf-8")
    card_path = tmp_path / "ctx.qkvc"
    runner = CliRunner()
    exported = runner.invoke(
        app,
        [
            *("card", "export", "--model", str(llama_path), "--prompt-file", str(prompt)),
            *("--out", str(card_path), "--budget", "16", "--threads", "2"),
        ],
    )
    assert exported.exit_code == 0, exported.output
    assert re.search(r"wrote .*ctx.qkvc: [\d,]+ tokens", exported.stdout)
    imported = runner.invoke(
        app,
        [
            *("card", "import", str(card_path), "--model", str(llama_path), "--ask", " Then"),
            *("--max-tokens", "6", "--threads", "2", "--json"),
        ],
    )
    assert imported.exit_code == 0, imported.output
    payload = json.loads(imported.stdout.strip().splitlines()[-1])

    reference = llama_cpp.Llama(str(llama_path), n_ctx=512, n_threads=2, verbose=False)
    try:
        tokens = reference.tokenize(prompt.read_text().encode(), add_bos=True)
        tokens += reference.tokenize(b" Then", add_bos=False, special=True)
        expected = reference.create_completion(tokens, max_tokens=6, temperature=0.0)
    finally:
        reference.close()
    assert payload["n_tokens"] == CacheCard.load(card_path).n_tokens
    assert payload["answer"] == expected["choices"][0]["text"]


def test_card_export_needs_one_prompt(llama_path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["card", "export", "--model", str(llama_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "exactly one of --prompt-file and --prompt" in result.output


def test_card_import_wrong_model(llama_path: Path, llama_seed1_path: Path, tmp_path: Path) -> None:
    card_path = tmp_path / "ctx.qkvc"
    runner = CliRunner()
    exported = runner.invoke(
        app, ["card", "export", "--model", str(llama_path), "--prompt", PARAGRAPH, "--out", str(card_path)]
    )
    assert exported.exit_code == 0, exported.output
    imported = runner.invoke(app, ["card", "import", str(card_path), "--model", str(llama_seed1_path), "--ask", "x"])
    assert imported.exit_code == 1
    assert "different model" in imported.output
