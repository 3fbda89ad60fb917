"""Tests of pipeline files and of chains of agents that hand their context on as cards, locally and over HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PARAGRAPH
from typer.testing import CliRunner

from qkvshare_edge.agents import load_agents
from qkvshare_edge.chat import AgentPool
from qkvshare_edge.cli import app
from qkvshare_edge.controllers import DEFAULT_CONTROLLER
from qkvshare_edge.pipeline import PipelineFileError, PipelineHopError, load_pipeline, run_pipeline
from qkvshare_edge.server import AgentService, start_server, stop_server

TASK = "When does the ferry leave?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, llama_path: Path, llama_seed1_path: Path) -> Path:
    """A folder with an agents file (a, b, c on one model, other on another) and the notes file."""
    path = tmp_path_factory.mktemp("pipeline")
    (path / "notes.txt").write_text(PARAGRAPH * 2, encoding="utf-8")
    (path / "agents.toml").write_text(
        f"""
[defaults]
model = "{llama_path}"
n_ctx = 1024
threads = 2
flash_attn = true
max_tokens = 6

[agents.a]
[agents.b]
budget = 6
[agents.c]
controller = "uniform"
[agents.other]
model = "{llama_seed1_path}"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def pool(folder: Path) -> Iterator[AgentPool]:
    agents = AgentPool(load_agents(folder / "agents.toml"))
    yield agents
    agents.close()


def write_pipeline(folder: Path, text: str, name: str = "pipeline.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


CHAIN = f"""
task = "{TASK}"
context_file = "notes.txt"

[[hops]]
agent = "a"
ask = "Read the notes."

[[hops]]
agent = "b"

[[hops]]
agent = "c"
ask = "Is that right?"
"""


# -- pipeline files ------------------------------------------------------------------------


def test_load_pipeline(folder: Path) -> None:
    pipeline = load_pipeline(write_pipeline(folder, CHAIN))
    assert pipeline.task == TASK
    assert pipeline.context_file == folder / "notes.txt"
    assert [hop.agent for hop in pipeline.hops] == ["a", "b", "c"]
    assert [hop.ask for hop in pipeline.hops] == ["Read the notes.", TASK, "Is that right?"]


def test_load_pipeline_short_form(folder: Path) -> None:
    pipeline = load_pipeline(write_pipeline(folder, f'task = "{TASK}"\nhops = ["a", "b"]\n', "short.toml"))
    assert pipeline.context_file is None
    assert [(hop.agent, hop.ask) for hop in pipeline.hops] == [("a", TASK), ("b", TASK)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('hops = ["a", "b"]\n', "key 'task'"),
        ('task = "t"\nhops = ["a"]\n', "at least two agents"),
        ('task = "t"\nhops = ["a", "a"]\n', "hop 2: agent 'a' repeats the previous hop"),
        ('task = "t"\nhops = ["a", 3]\n', "hop 2: must be an agent name"),
        ('task = "t"\n[[hops]]\nagent = "a"\n[[hops]]\nagnet = "b"\n', "hop 2: unknown key 'agnet'"),
        ('task = "t"\n[[hops]]\nagent = "a"\n[[hops]]\nagent = "b"\nask = ""\n', "hop 2: key 'ask'"),
        ('task = "t"\ncontext_file = "missing.txt"\nhops = ["a", "b"]\n', "file not found"),
        ('task = "t"\nbudget = 4\nhops = ["a", "b"]\n', "unknown key 'budget'"),
        ('task = "t"\nhops = [\n', "not valid TOML"),
    ],
    ids=["no-task", "one-hop", "repeat", "not-a-name", "unknown-hop-key", "empty-ask", "no-context", "top-key", "toml"],
)
def test_invalid_pipeline_errors(folder: Path, text: str, expected: str) -> None:
    path = write_pipeline(folder, text, "invalid.toml")
    with pytest.raises(PipelineFileError) as info:
        load_pipeline(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_missing_pipeline_file(folder: Path) -> None:
    with pytest.raises(PipelineFileError, match="pipeline file not found"):
        load_pipeline(folder / "absent.toml")


# -- running chains ------------------------------------------------------------------------


def test_chain_hands_context_forward(folder: Path, pool: AgentPool) -> None:
    seen: list[int] = []
    results = run_pipeline(load_pipeline(write_pipeline(folder, CHAIN)), pool, on_hop=lambda r: seen.append(r.index))
    assert seen == [1, 2, 3]
    first, second, third = results
    assert first.handoff is None
    assert first.n_tokens > 100  # the notes were prefilled
    for result in results:
        assert result.reply_tokens > 0
        assert result.ttft_ms > 0
    assert second.handoff is not None and third.handoff is not None
    assert (second.handoff.source, third.handoff.source) == ("a", "b")
    assert (second.handoff.hop, third.handoff.hop) == (1, 2)
    # Each hop hands off at the sender's settings.
    assert (second.handoff.budget, third.handoff.budget) == (8.0, 6.0)
    assert second.handoff.card_bytes > 0
    # Each receiver starts from the whole context so far: the previous context plus one exchange.
    assert second.n_tokens == second.handoff.n_tokens > first.n_tokens
    assert third.n_tokens == third.handoff.n_tokens > second.n_tokens
    assert third.handoff.card is not None and second.handoff.card is not None
    assert third.handoff.card.provenance.parent_sha256 == second.handoff.card.sha256


def test_chain_through_server(folder: Path, pool: AgentPool) -> None:
    service = AgentService(load_agents(folder / "agents.toml").get("b"), max_sessions=1, threads=2)
    server = start_server(service, "127.0.0.1", 0)
    try:
        text = f'task = "{TASK}"\ncontext_file = "notes.txt"\nhops = ["a", "{server.url}", "c"]\n'
        results = run_pipeline(load_pipeline(write_pipeline(folder, text, "remote.toml")), pool)
        remote, last = results[1], results[2]
        assert remote.agent.startswith("b@127.0.0.1:")
        assert remote.reply_tokens > 0
        assert last.handoff is not None
        # The server's session card continues the chain: one hop more, and the remote reply is in it.
        assert last.handoff.hop == 2
        assert last.n_tokens > remote.n_tokens
    finally:
        pool.close()
        stop_server(server)


def test_chain_stops_at_wrong_model(folder: Path, pool: AgentPool) -> None:
    path = write_pipeline(folder, f'task = "{TASK}"\nhops = ["a", "other"]\n', "mismatch.toml")
    with pytest.raises(PipelineHopError) as info:
        run_pipeline(load_pipeline(path), pool)
    assert info.value.index == 2
    assert "hop 2 (other) failed" in str(info.value)
    assert "different model" in str(info.value)


def test_chain_unknown_agent(folder: Path, pool: AgentPool) -> None:
    path = write_pipeline(folder, f'task = "{TASK}"\nhops = ["a", "zed"]\n', "unknown.toml")
    with pytest.raises(ValueError, match="no agent named 'zed'"):
        run_pipeline(load_pipeline(path), pool)


# -- command line --------------------------------------------------------------------------


def test_pipeline_command_prints_hops(folder: Path) -> None:
    path = write_pipeline(folder, CHAIN, "cli.toml")
    result = CliRunner().invoke(app, ["pipeline", str(path), "--agents", str(folder / "agents.toml")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("hop 1 a: context ")
    hop_lines = [line for line in lines if line.startswith("hop ")]
    assert len(hop_lines) == 3
    assert hop_lines[1].startswith("hop 2 b (card from a): context ")
    assert f" bytes (budget 8, {DEFAULT_CONTROLLER}, hop 1)" in hop_lines[1]
    assert "TTFT" in hop_lines[2]
    assert any(line.startswith("  | ") for line in lines)


def test_pipeline_command_json(folder: Path) -> None:
    path = write_pipeline(folder, CHAIN, "json.toml")
    result = CliRunner().invoke(app, ["pipeline", str(path), "--agents", str(folder / "agents.toml"), "--json"])
    assert result.exit_code == 0, result.output
    hops = [json.loads(line) for line in result.stdout.splitlines()]
    assert [hop["hop"] for hop in hops] == [1, 2, 3]
    assert "card_bytes" not in hops[0]
    assert hops[1]["from"] == "a"
    assert hops[2]["card_hop"] == 2
    assert all(hop["reply_tokens"] > 0 for hop in hops)


def test_pipeline_command_reports_errors(folder: Path) -> None:
    path = write_pipeline(folder, f'task = "{TASK}"\nhops = ["a", "other"]\n', "cli-mismatch.toml")
    result = CliRunner().invoke(app, ["pipeline", str(path), "--agents", str(folder / "agents.toml")])
    assert result.exit_code == 1
    assert "hop 2 (other) failed" in result.output
