"""Agents file: named agents with a model, a role, context and sampling settings, and a handoff budget.

An agents file is TOML (`agents.toml` in the working directory by default):

    default_agent = "reader"            # optional; the first agent otherwise

    [defaults]                          # optional; every agent inherits these keys
    model = "gemma3-270m"

    [agents.reader]
    system = "You read the user's files carefully."
    n_ctx = 4096
    handoff_to = "answerer"

    [agents.answerer]
    budget = 6.0

Every key of `AgentConfig` except `name` may appear in `[defaults]` or in an
agent's table. Without a file, two built-in agents (`agent1`, `agent2`) on
the default model hand off to each other. Errors name the file, the agent
and the key, and raise `AgentsFileError`.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .controllers import CONTROLLERS, DEFAULT_CONTROLLER
from .errors import QKVShareError
from .models import DEFAULT_MODEL, list_models

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)

DEFAULT_AGENTS_FILE = "agents.toml"

# Card budget of an agent's handoffs, in bits per K/V element. It is above the library's default of 4
# because chat answers are sensitive to it. After a 1,005-token file, Gemma 3 270M base (greedy) gave the
# same answers as with a lossless 16-bit card to 3 of 4 questions with an 8-bit card, and to none with a
# 4-bit card.
DEFAULT_AGENT_BUDGET_BITS = 8.0

# ggml type ids of the KV cache types that the card translator supports (llama.cpp's `enum ggml_type`).
CACHE_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}
_QUANTIZED_CACHE_TYPES = frozenset({"q4_0", "q8_0"})

_AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The built-in agents run a base model, which does not follow instructions: a system prompt only adds text
# that the answers drift toward, so they have none.
BUILTIN_SYSTEM_PROMPT = ""


class AgentsFileError(QKVShareError, ValueError):
    """The agents file is missing, is not valid TOML, or contains an invalid agent definition."""


@dataclass(frozen=True)
class AgentConfig:
    """One agent: its model, role, context, sampling and handoff settings."""

    name: str
    model: str = DEFAULT_MODEL
    system: str = ""
    description: str = ""
    n_ctx: int = 4096
    threads: int | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool = False
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    repeat_penalty: float = 1.1
    max_tokens: int = 256
    seed: int = 0
    budget: float = DEFAULT_AGENT_BUDGET_BITS
    controller: str = DEFAULT_CONTROLLER
    handoff_to: str | None = None

    def llama_kwargs(self) -> dict[str, Any]:
        """Return the keyword arguments of `Llama` for this agent's context (without the model path)."""
        return {
            "n_ctx": self.n_ctx,
            "n_threads": self.threads,
            "n_threads_batch": self.threads,
            "flash_attn": self.flash_attn,
            "type_k": CACHE_TYPES[self.cache_type_k],
            "type_v": CACHE_TYPES[self.cache_type_v],
            "verbose": False,
        }


@dataclass(frozen=True)
class AgentsFile:
    """The agents of one file (or the built-in agents when `path` is None)."""

    agents: dict[str, AgentConfig]
    default_agent: str
    path: Path | None = None

    @property
    def source(self) -> str:
        """The file path as text, or 'built-in agents'."""
        return str(self.path) if self.path is not None else "built-in agents"

    def get(self, name: str | None) -> AgentConfig:
        """Return the agent called `name`, or the default agent for None.

        Raises:
            AgentsFileError: no agent has that name.
        """
        if name is None:
            return self.agents[self.default_agent]
        agent = self.agents.get(name)
        if agent is None:
            raise AgentsFileError(
                f"{self.source}: no agent named {name!r}{_suggestion(name, self.agents)}; "
                f"defined agents: {', '.join(self.agents)}"
            )
        return agent

    def handoff_target(self, name: str) -> str | None:
        """Return where agent `name` hands off by default: its `handoff_to`, else the next agent in the file."""
        agent = self.get(name)
        if agent.handoff_to is not None:
            return agent.handoff_to
        others = [other for other in self.agents if other != name]
        return others[0] if others else None


def is_url(target: str) -> bool:
    """Return whether a handoff target is the URL of a `qkvedge serve` (rather than an agent name)."""
    return target.startswith(("http://", "https://"))


def builtin_agents() -> AgentsFile:
    """Return the two built-in agents on the default model, which hand off to each other."""
    agents = {
        "agent1": AgentConfig(
            name="agent1",
            system=BUILTIN_SYSTEM_PROMPT,
            description="built-in agent on the default model; hands off to agent2",
            handoff_to="agent2",
        ),
        "agent2": AgentConfig(
            name="agent2",
            system=BUILTIN_SYSTEM_PROMPT,
            description="built-in agent on the default model; hands off to agent1",
            handoff_to="agent1",
        ),
    }
    return AgentsFile(agents=agents, default_agent="agent1")


def load_agents(path: str | os.PathLike[str] | None = None, *, cwd: Path | None = None) -> AgentsFile:
    """Load an agents file, or the built-in agents.

    Args:
        path: the agents file. None looks for `agents.toml` in `cwd` and falls
            back to the built-in agents when there is none.
        cwd: directory searched when `path` is None (default: the working directory).

    Raises:
        AgentsFileError: the file is missing (for an explicit path), unreadable,
            not valid TOML, or defines an invalid agent.
    """
    if path is None:
        candidate = (cwd or Path.cwd()) / DEFAULT_AGENTS_FILE
        if not candidate.is_file():
            logger.debug("no %s in %s; using the built-in agents", DEFAULT_AGENTS_FILE, candidate.parent)
            return builtin_agents()
        file_path = candidate
    else:
        file_path = Path(path).expanduser()
        if not file_path.is_file():
            raise AgentsFileError(
                f"agents file not found: {file_path}; pass an existing TOML file with --agents, "
                f"or omit it to use {DEFAULT_AGENTS_FILE} in the working directory or the built-in agents"
            )
    try:
        text = file_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentsFileError(f"{file_path}: cannot read the agents file: {exc}") from exc
    return parse_agents(text, file_path)


def parse_agents(text: str, path: Path) -> AgentsFile:
    """Parse and validate the TOML text of an agents file; `path` names it in errors and anchors relative paths.

    Raises:
        AgentsFileError: naming the file, the agent and the key at fault.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AgentsFileError(f"{path}: not valid TOML: {exc}") from exc

    unknown = sorted(set(document) - {"default_agent", "defaults", "agents"})
    if unknown:
        raise AgentsFileError(
            f"{path}: unknown top-level key {unknown[0]!r}{_suggestion(unknown[0], ['default_agent', 'defaults'])}; "
            "the file holds `default_agent`, a `[defaults]` table and `[agents.NAME]` tables"
        )

    defaults = document.get("defaults", {})
    if not isinstance(defaults, dict):
        raise AgentsFileError(f"{path}: `defaults` must be a table ([defaults]), got {type(defaults).__name__}")
    base = _agent_from_table("defaults", defaults, path, AgentConfig(name="defaults"), where="[defaults]")

    tables = document.get("agents")
    if not isinstance(tables, dict) or not tables:
        raise AgentsFileError(f"{path}: no agents defined; add at least one table such as [agents.reader]")

    agents: dict[str, AgentConfig] = {}
    for name, table in tables.items():
        if not _AGENT_NAME.match(name):
            raise AgentsFileError(
                f"{path}: agent {name!r}: invalid name; use letters, digits, '_', '.' and '-', starting with a "
                "letter or digit"
            )
        if not isinstance(table, dict):
            raise AgentsFileError(f"{path}: agent {name!r}: must be a table ([agents.{name}]), got a value")
        agents[name] = _agent_from_table(name, table, path, replace(base, name=name), where=f"agent {name!r}")

    default_agent = document.get("default_agent", next(iter(agents)))
    if not isinstance(default_agent, str) or default_agent not in agents:
        raise AgentsFileError(
            f"{path}: key 'default_agent': {default_agent!r} is not a defined agent"
            f"{_suggestion(str(default_agent), agents)}; defined agents: {', '.join(agents)}"
        )
    for agent in agents.values():
        target = agent.handoff_to
        if target is not None and not is_url(target) and target not in agents:
            raise AgentsFileError(
                f"{path}: agent {agent.name!r}: key 'handoff_to': {target!r} is neither a defined agent"
                f"{_suggestion(target, agents)} nor an http:// URL of a `qkvedge serve`"
            )
    logger.info("loaded %d agents from %s", len(agents), path)
    return AgentsFile(agents=agents, default_agent=default_agent, path=path)


# -- validation of one table ----------------------------------------------------

_KEYS = [f.name for f in fields(AgentConfig) if f.name != "name"]


def _agent_from_table(name: str, table: dict[str, Any], path: Path, base: AgentConfig, *, where: str) -> AgentConfig:
    values: dict[str, Any] = {}
    for key, value in table.items():
        prefix = f"{path}: {where}: key {key!r}"
        if key not in _KEYS:
            raise AgentsFileError(f"{prefix}: unknown key{_suggestion(key, _KEYS)}; valid keys: {', '.join(_KEYS)}")
        values[key] = _check_value(key, value, prefix, path)
    agent = replace(base, **values)

    if agent.cache_type_v in _QUANTIZED_CACHE_TYPES and not agent.flash_attn:
        raise AgentsFileError(
            f"{path}: {where}: key 'cache_type_v': {agent.cache_type_v!r} needs flash attention in llama.cpp; "
            "set flash_attn = true or use cache_type_v = 'f16'"
        )
    return agent


def _check_value(key: str, value: Any, prefix: str, path: Path) -> Any:
    if key in ("system", "description"):
        return _string(value, prefix, allow_empty=True)
    if key == "model":
        return _model(_string(value, prefix), path)
    if key in ("cache_type_k", "cache_type_v"):
        text = _string(value, prefix).lower()
        if text not in CACHE_TYPES:
            raise AgentsFileError(f"{prefix}: unsupported KV cache type {value!r}; use one of {', '.join(CACHE_TYPES)}")
        return text
    if key == "controller":
        text = _string(value, prefix)
        if text not in CONTROLLERS:
            raise AgentsFileError(
                f"{prefix}: unknown controller {value!r}; use one of {', '.join(sorted(CONTROLLERS))}"
            )
        return text
    if key == "handoff_to":
        return _string(value, prefix)
    if key == "flash_attn":
        if not isinstance(value, bool):
            raise AgentsFileError(f"{prefix}: must be true or false, got {value!r}")
        return value

    # Numbers: (kind, lowest allowed, highest allowed, whether the lowest is excluded).
    limits: dict[str, tuple[type, float, float, bool]] = {
        "n_ctx": (int, 16, 1 << 24, False),
        "threads": (int, 1, 1024, False),
        "temperature": (float, 0.0, 100.0, False),
        "top_k": (int, 0, 1 << 24, False),
        "top_p": (float, 0.0, 1.0, True),
        "repeat_penalty": (float, 0.0, 100.0, True),
        "max_tokens": (int, 1, 1 << 24, False),
        "seed": (int, 0, (1 << 32) - 1, False),
        "budget": (float, 0.0, 16.0, True),
    }
    kind, low, high, open_low = limits[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
        expected = "an integer" if kind is int else "a number"
        raise AgentsFileError(f"{prefix}: must be {expected}, got {value!r}")
    too_low = value <= low if open_low else value < low
    if too_low or value > high:
        interval = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise AgentsFileError(f"{prefix}: {value!r} is out of range; use a value in {interval}")
    return kind(value)


def _string(value: Any, prefix: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise AgentsFileError(f"{prefix}: must be a string, got {value!r}")
    if not allow_empty and not value.strip():
        raise AgentsFileError(f"{prefix}: must not be empty")
    return value


def _model(value: str, path: Path) -> str:
    """Keep registry names; make relative model paths relative to the agents file's directory."""
    if value in {entry.name for entry in list_models()}:
        return value
    model_path = Path(value).expanduser()
    if not model_path.is_absolute():
        model_path = path.parent / model_path
    return str(model_path)


def _suggestion(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
