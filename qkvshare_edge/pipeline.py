"""`qkvedge pipeline`: run a task through a chain of agents, each handing its context to the next as a card.

A pipeline file is TOML:

    task = "Summarize the notes, then check the summary."
    context_file = "notes.txt"         # optional; prefilled by the first agent (relative to this file)

    [[hops]]
    agent = "reader"                   # an agent of the agents file, or the URL of a `qkvedge serve`
    ask = "Summarize the notes."       # optional; the task by default

    [[hops]]
    agent = "checker"
    ask = "Is the summary accurate?"

`hops = ["reader", "checker"]` is the short form when every hop gets the task.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .agents import is_url
from .chat import AgentPool, HandoffResult, ProgressBar, TextCallback, hand_off, handoff_settings
from .errors import QKVShareError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)


class PipelineFileError(QKVShareError, ValueError):
    """The pipeline file is missing, is not valid TOML, or describes an invalid chain."""


class PipelineHopError(QKVShareError, RuntimeError):
    """A hop of the chain failed: its handoff, its model or its reply."""

    def __init__(self, index: int, agent: str, cause: Exception) -> None:
        super().__init__(f"hop {index} ({agent}) failed: {cause}")
        self.index = index
        self.agent = agent


@dataclass(frozen=True)
class Hop:
    """One agent of the chain and the message it gets."""

    agent: str
    ask: str


@dataclass(frozen=True)
class Pipeline:
    """A task, an optional context file, and the chain of hops."""

    task: str
    hops: list[Hop]
    context_file: Path | None
    path: Path


@dataclass
class HopResult:
    """The record of one hop: the context it started from, the card it received, and its reply."""

    index: int
    agent: str
    n_tokens: int  # context tokens when the agent started its reply
    reply: str
    reply_tokens: int
    ttft_ms: float
    handoff: HandoffResult | None  # the handoff into this hop (None for the first)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hop": self.index,
            "agent": self.agent,
            "n_tokens": self.n_tokens,
            "reply": self.reply,
            "reply_tokens": self.reply_tokens,
            "ttft_ms": round(self.ttft_ms, 2),
        }
        if self.handoff is not None:
            out.update(
                {
                    "from": self.handoff.source,
                    "card_bytes": self.handoff.card_bytes,
                    "card_hop": self.handoff.hop,
                    "budget": self.handoff.budget,
                    "controller": self.handoff.controller,
                    "export_ms": round(self.handoff.export_ms, 2),
                    "import_ms": round(self.handoff.import_ms, 2),
                }
            )
        return out

    def summary(self) -> str:
        """Return the hop's one-line numbers (the reply follows on its own lines)."""
        head = f"hop {self.index} {self.agent}"
        if self.handoff is None:
            return (
                f"{head}: context {self.n_tokens:,} tokens, TTFT {self.ttft_ms:.0f} ms, "
                f"{self.reply_tokens} reply tokens"
            )
        h = self.handoff
        return (
            f"{head} (card from {h.source}): context {self.n_tokens:,} tokens, card {h.card_bytes:,} bytes "
            f"(budget {h.budget:g}, {h.controller}, hop {h.hop}), export {h.export_ms:.0f} ms, "
            f"import {h.import_ms:.0f} ms, TTFT {self.ttft_ms:.0f} ms, {self.reply_tokens} reply tokens"
        )


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Load and validate a pipeline file.

    Raises:
        PipelineFileError: naming the file, the hop and the key at fault.
    """
    file_path = Path(path).expanduser()
    try:
        document = tomllib.loads(file_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PipelineFileError(f"pipeline file not found: {file_path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineFileError(f"{file_path}: cannot read the pipeline file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PipelineFileError(f"{file_path}: not valid TOML: {exc}") from exc

    unknown = sorted(set(document) - {"task", "context_file", "hops"})
    if unknown:
        raise PipelineFileError(
            f"{file_path}: unknown key {unknown[0]!r}; a pipeline file contains task, context_file and hops"
        )
    task = document.get("task")
    if not isinstance(task, str) or not task.strip():
        raise PipelineFileError(f"{file_path}: key 'task' must be a non-empty string, got {task!r}")

    context_file = None
    if "context_file" in document:
        value = document["context_file"]
        if not isinstance(value, str) or not value:
            raise PipelineFileError(f"{file_path}: key 'context_file' must be a file path, got {value!r}")
        context_file = Path(value).expanduser()
        if not context_file.is_absolute():
            context_file = file_path.parent / context_file
        if not context_file.is_file():
            raise PipelineFileError(f"{file_path}: key 'context_file': file not found: {context_file}")

    raw_hops = document.get("hops")
    if not isinstance(raw_hops, list) or len(raw_hops) < 2:
        raise PipelineFileError(
            f"{file_path}: key 'hops' must list at least two agents ([[hops]] tables or a list of names)"
        )
    hops = []
    for index, raw in enumerate(raw_hops, start=1):
        where = f"{file_path}: hop {index}"
        if isinstance(raw, str):
            raw = {"agent": raw}
        if not isinstance(raw, dict):
            raise PipelineFileError(f"{where}: must be an agent name or a table with 'agent', got {raw!r}")
        extra = sorted(set(raw) - {"agent", "ask"})
        if extra:
            raise PipelineFileError(f"{where}: unknown key {extra[0]!r}; a hop contains 'agent' and 'ask'")
        agent = raw.get("agent")
        if not isinstance(agent, str) or not agent:
            raise PipelineFileError(f"{where}: key 'agent' must be an agent name or a URL, got {agent!r}")
        ask = raw.get("ask", task)
        if not isinstance(ask, str) or not ask.strip():
            raise PipelineFileError(f"{where}: key 'ask' must be a non-empty string, got {ask!r}")
        if hops and hops[-1].agent == agent:
            raise PipelineFileError(
                f"{where}: agent {agent!r} repeats the previous hop; a hop hands off to another agent"
            )
        hops.append(Hop(agent, ask))
    return Pipeline(task=task, hops=hops, context_file=context_file, path=file_path)


def run_pipeline(
    pipeline: Pipeline,
    pool: AgentPool,
    *,
    on_hop: Callable[[HopResult], None] | None = None,
    on_text: Callable[[int], TextCallback | None] | None = None,
    progress: ProgressBar | None = None,
) -> list[HopResult]:
    """Run the chain: the first agent reads the context file and replies, and each next one continues from a card.

    Args:
        on_hop: called after each hop with its result.
        on_text: returns the callback that receives hop N's reply text as it is generated.
        progress: progress bar for the context file's prefill.

    Raises:
        AgentsFileError: a hop names an agent that the agents file lacks.
        PipelineFileError: the context file cannot be read.
        PipelineHopError: a handoff or a reply failed; the message names the hop and the cause.
    """
    for hop in pipeline.hops:
        if not is_url(hop.agent):
            pool.agents.get(hop.agent)

    results: list[HopResult] = []
    previous = None
    for index, hop in enumerate(pipeline.hops, start=1):
        agent = pool.get(hop.agent)
        handoff = None
        try:
            if previous is None:
                if pipeline.context_file is not None:
                    _prefill(agent, pipeline.context_file, progress)
            else:
                budget, controller = handoff_settings(previous)
                handoff = hand_off(previous, agent, budget=budget, controller=controller)
            n_tokens = agent.n_tokens
            reply = agent.ask(hop.ask, on_text=on_text(index) if on_text is not None else None)
        except (QKVShareError, ValueError, OSError) as exc:
            raise PipelineHopError(index, hop.agent, exc) from exc
        if handoff is not None:
            handoff.ttft_ms = reply.ttft_ms
        result = HopResult(index, agent.name, n_tokens, reply.text, reply.n_tokens, reply.ttft_ms, handoff)
        logger.info("%s", result.summary())
        results.append(result)
        if on_hop is not None:
            on_hop(result)
        previous = agent
    return results


def _prefill(agent: Any, path: Path, progress: ProgressBar | None) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineFileError(f"cannot read the context file {path}: {exc}") from exc
    try:
        agent.add_document(path.name, text, progress)
    finally:
        if progress is not None:
            progress.close()
