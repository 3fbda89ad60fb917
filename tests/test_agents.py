"""Tests of the agents file: loading, defaults, built-in agents, and errors that name the file, agent and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkvshare_edge.agents import (
    CACHE_TYPES,
    DEFAULT_AGENTS_FILE,
    AgentsFileError,
    builtin_agents,
    is_url,
    load_agents,
)
from qkvshare_edge.cli import app
from qkvshare_edge.models import DEFAULT_MODEL

VALID = """
default_agent = "answerer"

[defaults]
model = "models/tiny.gguf"
n_ctx = 1024
threads = 2

[agents.reader]
system = "You read files."
handoff_to = "answerer"
budget = 6

[agents.answerer]
model = "tiny-llama"
temperature = 0.7
cache_type_k = "Q8_0"
cache_type_v = "q8_0"
flash_attn = true
handoff_to = "http://127.0.0.1:8765"
"""


def write(tmp_path: Path, text: str, name: str = "agents.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_agents_without_file(tmp_path: Path) -> None:
    agents = load_agents(cwd=tmp_path)
    assert agents.path is None
    assert list(agents.agents) == ["agent1", "agent2"]
    assert agents.default_agent == "agent1"
    assert agents.get(None).model == DEFAULT_MODEL
    assert agents.handoff_target("agent1") == "agent2"
    assert agents.handoff_target("agent2") == "agent1"
    assert agents.source == "built-in agents"


def test_agents_file_in_working_directory(tmp_path: Path) -> None:
    write(tmp_path, VALID, DEFAULT_AGENTS_FILE)
    agents = load_agents(cwd=tmp_path)
    assert agents.path == tmp_path / DEFAULT_AGENTS_FILE
    assert list(agents.agents) == ["reader", "answerer"]


def test_defaults_and_overrides(tmp_path: Path) -> None:
    agents = load_agents(write(tmp_path, VALID))
    reader, answerer = agents.get("reader"), agents.get("answerer")
    assert agents.default_agent == "answerer"
    assert agents.get(None) is answerer
    # Relative model paths are relative to the agents file; registry names stay names.
    assert reader.model == str(tmp_path / "models" / "tiny.gguf")
    assert answerer.model == "tiny-llama"
    assert reader.n_ctx == answerer.n_ctx == 1024
    assert reader.threads == 2
    assert reader.budget == 6.0
    assert isinstance(reader.budget, float)
    assert reader.system == "You read files."
    assert answerer.temperature == 0.7
    assert answerer.cache_type_k == "q8_0"
    assert agents.handoff_target("reader") == "answerer"
    assert is_url(str(agents.handoff_target("answerer")))


def test_llama_kwargs(tmp_path: Path) -> None:
    answerer = load_agents(write(tmp_path, VALID)).get("answerer")
    kwargs = answerer.llama_kwargs()
    assert kwargs["n_ctx"] == 1024
    assert kwargs["n_threads"] == 2
    assert kwargs["type_k"] == CACHE_TYPES["q8_0"]
    assert kwargs["type_v"] == CACHE_TYPES["q8_0"]
    assert kwargs["flash_attn"] is True
    assert kwargs["verbose"] is False


def test_handoff_target_defaults_to_next_agent(tmp_path: Path) -> None:
    agents = load_agents(write(tmp_path, "[agents.one]\n[agents.two]\n[agents.three]\n"))
    assert agents.handoff_target("one") == "two"
    assert agents.handoff_target("two") == "one"
    single = load_agents(write(tmp_path, "[agents.only]\n", "single.toml"))
    assert single.handoff_target("only") is None


def test_unknown_agent_name_lists_agents(tmp_path: Path) -> None:
    agents = load_agents(write(tmp_path, VALID))
    with pytest.raises(AgentsFileError) as info:
        agents.get("reeder")
    message = str(info.value)
    assert "'reeder'" in message
    assert "did you mean 'reader'" in message
    assert "reader, answerer" in message


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(AgentsFileError, match=r"agents file not found: .*nope\.toml"):
        load_agents(tmp_path / "nope.toml")


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[agents.a\nmodel = 1\n")
    with pytest.raises(AgentsFileError) as info:
        load_agents(path)
    assert str(path) in str(info.value)
    assert "not valid TOML" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[agents.a]\nn_cxt = 512\n", ("agent 'a'", "key 'n_cxt'", "unknown key", "did you mean 'n_ctx'")),
        ("[agents.a]\nn_ctx = '512'\n", ("agent 'a'", "key 'n_ctx'", "must be an integer")),
        ("[agents.a]\nn_ctx = 1.5\n", ("agent 'a'", "key 'n_ctx'", "must be an integer")),
        ("[agents.a]\nn_ctx = 8\n", ("agent 'a'", "key 'n_ctx'", "out of range")),
        ("[agents.a]\nthreads = true\n", ("agent 'a'", "key 'threads'", "must be an integer")),
        ("[agents.a]\nbudget = 0\n", ("agent 'a'", "key 'budget'", "out of range", "(0, 16]")),
        ("[agents.a]\nbudget = 17\n", ("agent 'a'", "key 'budget'", "out of range")),
        ("[agents.a]\ntop_p = 0\n", ("agent 'a'", "key 'top_p'", "out of range")),
        ("[agents.a]\ntemperature = -1\n", ("agent 'a'", "key 'temperature'", "out of range")),
        ("[agents.a]\ncontroller = 'random'\n", ("agent 'a'", "key 'controller'", "sink-recent")),
        ("[agents.a]\ncache_type_k = 'q5_1'\n", ("agent 'a'", "key 'cache_type_k'", "q8_0")),
        ("[agents.a]\ncache_type_v = 'q4_0'\n", ("agent 'a'", "key 'cache_type_v'", "flash_attn = true")),
        ("[agents.a]\nflash_attn = 'yes'\n", ("agent 'a'", "key 'flash_attn'", "true or false")),
        ("[agents.a]\nmodel = ''\n", ("agent 'a'", "key 'model'", "must not be empty")),
        ("[agents.a]\nsystem = 3\n", ("agent 'a'", "key 'system'", "must be a string")),
        ("[agents.a]\nhandoff_to = 'b'\n", ("agent 'a'", "key 'handoff_to'", "'b'")),
        ("[defaults]\nmax_tokens = 0\n[agents.a]\n", ("[defaults]", "key 'max_tokens'", "out of range")),
        ("default_agent = 'b'\n[agents.a]\n", ("key 'default_agent'", "'b'", "defined agents: a")),
        ("[agents.'bad name']\n", ("agent 'bad name'", "invalid name")),
        ("[agents]\na = 1\n", ("agent 'a'", "must be a table")),
        ("model = 'x'\n[agents.a]\n", ("unknown top-level key 'model'",)),
        ("[defaults]\nmodel = 'x'\n", ("no agents defined",)),
    ],
    ids=lambda value: value if isinstance(value, str) and "\n" not in value else None,
)
def test_invalid_file_errors(tmp_path: Path, text: str, expected: tuple[str, ...]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(AgentsFileError) as info:
        load_agents(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for part in expected:
        assert part in message


def test_builtin_agents_share_system_prompt() -> None:
    # Equal system prompts mean a handoff between the built-in agents adds no role text.
    agents = builtin_agents()
    assert agents.get("agent1").system == agents.get("agent2").system


def test_chat_cli_reports_agents_file_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[agents.a]\nn_ctx = 'big'\n")
    result = CliRunner().invoke(app, ["chat", "--agents", str(path), "--ask", "hello"])
    assert result.exit_code == 1
    assert "key 'n_ctx'" in result.output
    assert str(path) in result.output


def test_serve_cli_reports_unknown_agent(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    result = CliRunner().invoke(app, ["serve", "--agents", str(path), "--agent", "nobody", "--port", "0"])
    assert result.exit_code == 1
    assert "no agent named 'nobody'" in result.output
