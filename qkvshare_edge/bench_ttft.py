"""`qkvedge bench ttft`: the receiver's time to first token by handoff path.

For each context length, a sender reads the context once, saves llama.cpp's
own sequence state to a file and exports CacheCards at several budgets. A
receiver (a second context of the same model, in the same process) then
reaches its first token after a fixed follow-up prompt by each path:

- `reprefill`: decode the whole context plus the follow-up;
- `state`: `llama_state_seq_load_file`, then decode the follow-up;
- `card-b<budget>` and `card-default`: `CacheCard.load` plus `import_card`,
  then decode the follow-up.

Every path starts from an empty receiver sequence and ends at the greedy
first token (argmax of the last logits). The fast paths run in interleaved
rounds so that machine noise hits them alike; medians are reported.

The first re-prefill sample is the sender's own reading of the context: its
timed context prefill, then (after the files are written) the follow-up. The
batches are the same as one decode of context plus follow-up when the context
is a multiple of the batch size, and long contexts then cost one prefill, not
two. Further re-prefill samples run in the receiver.

Peak extra memory of export and import is measured in fresh child processes
(`python -m qkvshare_edge.bench_ttft PROBE_JSON`) from the resident-set high
water mark (Linux `/proc/self/clear_refs`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from . import __version__, codec
from .card import CacheCard
from .controllers import DEFAULT_CONTROLLER
from .demo import DEMO_QUESTION, build_context_tokens
from .handoff import DEFAULT_BUDGET_BITS, DEFAULT_K_BLOCK
from .llama import Llama

logger = logging.getLogger(__name__)

DEFAULT_CONTEXTS: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
CARD_BUDGETS: tuple[float, ...] = (16.0, 8.0, 4.0, 3.0)
# Controller of the fixed-budget cards. The `card-default` path uses the default budget and controller.
FIXED_BUDGET_CONTROLLER = "uniform"
# At and above this many context tokens, re-prefill gets `reprefill_repeats_long` samples.
LONG_CONTEXT = 8192
LINK_RANGE_MBPS: tuple[float, float] = (1.0, 1000.0)
DEFAULT_LINK_MBPS: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)

# Targets set for Gemma 3 270M on a 2-core CPU: card TTFT against llama.cpp's state, 8K export time, peak memory.
TARGET_CARD_OVER_STATE = 1.15
TARGET_EXPORT_MS_8K = 60.0
TARGET_EXPORT_CONTEXT = 8192
TARGET_MEMORY_OVER_KV = 2.0
# The default card's export (adaptive controller) against re-prefilling the context, at 8K tokens.
TARGET_EXPORT_OVER_PREFILL = 0.25

REPREFILL = "reprefill"
STATE = "state"
CARD_DEFAULT = "card-default"

IMPORT_STAGES_CARD = (
    "read",
    "verify",
    "decode_card",
    "build_state",
    "set_state",
    "follow_up_prefill",
    "first_token",
)
IMPORT_STAGES_STATE = ("load_file", "follow_up_prefill", "first_token")
IMPORT_STAGES_REPREFILL = ("prefill_context", "follow_up_prefill", "first_token")
EXPORT_STAGES_CARD = ("read_state", "decode_state", "score", "allocate", "encode", "write")
EXPORT_STAGES_STATE = ("save_file",)


@dataclass(frozen=True)
class PathSpec:
    """One way for the receiver to reach its first token."""

    name: str
    kind: str  # "reprefill", "state" or "card"
    budget: float = 0.0  # requested card budget (cards only)
    controller: str = ""

    def import_stages(self) -> tuple[str, ...]:
        if self.kind == "card":
            return IMPORT_STAGES_CARD
        if self.kind == STATE:
            return IMPORT_STAGES_STATE
        return IMPORT_STAGES_REPREFILL

    def export_stages(self) -> tuple[str, ...]:
        if self.kind == "card":
            return EXPORT_STAGES_CARD
        if self.kind == STATE:
            return EXPORT_STAGES_STATE
        return ()


def budget_label(budget: float) -> str:
    """Return 'b16' for 16.0, 'b4.5' for 4.5."""
    return f"b{budget:g}"


def path_specs(budgets: tuple[float, ...] = CARD_BUDGETS, controller: str = FIXED_BUDGET_CONTROLLER) -> list[PathSpec]:
    """Return the measured paths: re-prefill, llama.cpp state, one card per budget, the default card."""
    specs = [PathSpec(REPREFILL, REPREFILL), PathSpec(STATE, STATE)]
    specs += [PathSpec(f"card-{budget_label(b)}", "card", b, controller) for b in budgets]
    specs.append(PathSpec(CARD_DEFAULT, "card", DEFAULT_BUDGET_BITS, DEFAULT_CONTROLLER))
    return specs


@dataclass
class TtftConfig:
    """Settings of one `bench ttft` run."""

    model_path: str
    model_name: str
    contexts: list[int]
    repeats: int = 5
    reprefill_repeats: int = 3
    reprefill_repeats_long: int = 1
    follow_up_tokens: int = 20
    n_threads: int = 0  # 0: every core
    flash_attn: bool = False
    budgets: tuple[float, ...] = CARD_BUDGETS
    controller: str = FIXED_BUDGET_CONTROLLER
    link_mbps: list[float] = field(default_factory=lambda: list(DEFAULT_LINK_MBPS))
    memory: bool = True
    work_dir: Path | None = None
    command: str = ""

    @property
    def threads(self) -> int:
        return self.n_threads if self.n_threads > 0 else (os.cpu_count() or 1)

    def reprefill_samples(self, n_tokens: int) -> int:
        return max(1, self.reprefill_repeats_long if n_tokens >= LONG_CONTEXT else self.reprefill_repeats)

    def n_ctx(self, n_tokens: int) -> int:
        """Context size for `n_tokens` of context: room for the follow-up, rounded up to 256."""
        return 256 * math.ceil((n_tokens + self.follow_up_tokens + 8) / 256)


def parse_contexts(text: str) -> list[int]:
    """Parse '1K,2K,4096' into [1024, 2048, 4096].

    Raises:
        ValueError: on an empty list, a malformed entry or a length below 16.
    """
    out: list[int] = []
    for item in text.split(","):
        item = item.strip().upper()
        if not item:
            continue
        scale = 1024 if item.endswith("K") else 1
        digits = item[:-1] if scale == 1024 else item
        if not digits.isdigit():
            raise ValueError(f"context {item!r} is not a token count like 4096 or 4K")
        value = int(digits) * scale
        if value < 16:
            raise ValueError(f"context {value} is too short: use at least 16 tokens")
        out.append(value)
    if not out:
        raise ValueError("give at least one context length, e.g. --contexts 1K,2K")
    return sorted(set(out))


def parse_floats(text: str, label: str) -> list[float]:
    """Parse '1,10,100' into [1.0, 10.0, 100.0] (each positive)."""
    values = []
    for item in text.split(","):
        if item.strip():
            try:
                value = float(item)
            except ValueError:
                raise ValueError(f"{label} {item.strip()!r} is not a number") from None
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"{label} must be positive, got {item.strip()}")
            values.append(value)
    if not values:
        raise ValueError(f"give at least one {label}")
    return values


# -- environment -------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def environment(threads: int) -> dict[str, Any]:
    """Describe the machine and software of this run."""
    ggml_version = ""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for lib in sorted(lib_dir.glob("libggml-base.so.*.*")):
        ggml_version = lib.name.removeprefix("libggml-base.so.")
    return {
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, {_memory_gib()} GiB",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp": llama_cpp.llama_version().decode("utf-8", errors="replace"),
        "ggml": ggml_version,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip(" |"),
        "qkvshare_edge": __version__,
        "threads": threads,
        "load_average_start": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine shows up as noise in the timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# -- measurement helpers ------------------------------------------------------


def _now() -> float:
    return time.perf_counter()


def _ms(start: float, end: float) -> float:
    return (end - start) * 1e3


def _clear(llm: Llama) -> None:
    """Empty every sequence of `llm` (outside any timed region)."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    llm.n_tokens = 0


class ContextUnavailableError(RuntimeError):
    """llama.cpp could not create a context of the requested size (usually: not enough memory)."""


def _new_llama(config: TtftConfig, n_ctx: int) -> Llama:
    try:
        return Llama(
            config.model_path,
            n_ctx=n_ctx,
            n_threads=config.threads,
            n_threads_batch=config.threads,
            flash_attn=config.flash_attn,
            verbose=False,
        )
    except (ValueError, MemoryError) as exc:
        raise ContextUnavailableError(f"cannot create a context of n_ctx {n_ctx}: {exc}") from exc


def _warm_up(llm: Llama, tokens: list[int]) -> None:
    """Decode a few tokens once so no timed path pays for the first graph build."""
    llm.eval(tokens[:8])
    _clear(llm)


def _first_token(llm: Llama, follow_up: list[int], stages: dict[str, float]) -> int:
    """Decode the follow-up on top of the cache and pick the greedy first token."""
    start = _now()
    llm.eval(follow_up)
    mid = _now()
    token = int(np.argmax(llm.last_logits()))
    end = _now()
    stages["follow_up_prefill"] = _ms(start, mid)
    stages["first_token"] = _ms(mid, end)
    return token


@dataclass
class Sample:
    """One timed run of one path."""

    ttft_ms: float
    stages_ms: dict[str, float]
    first_token: int


def _save_state_file(llm: Llama, path: Path, tokens: list[int]) -> float:
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    start = _now()
    written = llama_cpp.llama_state_seq_save_file(llm.ctx, str(path).encode(), 0, array, len(tokens))
    elapsed = _ms(start, _now())
    if written == 0:
        raise RuntimeError(f"llama_state_seq_save_file failed for {path}: see llama.cpp's log")
    return elapsed


def _load_state_file(llm: Llama, path: Path) -> int:
    capacity = llm.n_ctx()
    tokens_out = (llama_cpp.llama_token * capacity)()
    count = ctypes.c_size_t(0)
    read = llama_cpp.llama_state_seq_load_file(
        llm.ctx, str(path).encode(), 0, tokens_out, capacity, ctypes.byref(count)
    )
    if read == 0:
        raise RuntimeError(f"llama_state_seq_load_file failed for {path}: see llama.cpp's log")
    n = int(count.value)
    llm.input_ids[:n] = np.ctypeslib.as_array(tokens_out)[:n]
    llm.n_tokens = n
    return n


def _run_reprefill(llm: Llama, context: list[int], follow_up: list[int]) -> Sample:
    stages: dict[str, float] = {}
    start = _now()
    llm.eval(context)
    stages["prefill_context"] = _ms(start, _now())
    token = _first_token(llm, follow_up, stages)
    return Sample(_ms(start, _now()), stages, token)


def _run_state(llm: Llama, path: Path, follow_up: list[int]) -> Sample:
    stages: dict[str, float] = {}
    start = _now()
    _load_state_file(llm, path)
    stages["load_file"] = _ms(start, _now())
    token = _first_token(llm, follow_up, stages)
    return Sample(_ms(start, _now()), stages, token)


def _run_card(llm: Llama, path: Path, follow_up: list[int], n_threads: int) -> Sample:
    stages: dict[str, float] = {}
    start = _now()
    card = CacheCard.load(path)
    stages["read"] = _ms(start, _now())
    llm.import_card(card, n_threads=n_threads)
    timing = llm.last_import_timing
    assert timing is not None
    for name in ("verify", "decode_card", "build_state", "set_state"):
        stages[name] = timing.stages_ms.get(name, 0.0)
    token = _first_token(llm, follow_up, stages)
    return Sample(_ms(start, _now()), stages, token)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _summarize(samples: list[Sample], stage_names: tuple[str, ...]) -> dict[str, Any]:
    return {
        "repeats": len(samples),
        "ttft_ms_median": _median([s.ttft_ms for s in samples]),
        "ttft_ms": [round(s.ttft_ms, 3) for s in samples],
        "stages_ms_median": {name: _median([s.stages_ms.get(name, 0.0) for s in samples]) for name in stage_names},
        "samples": [{"ttft_ms": s.ttft_ms, "stages_ms": s.stages_ms} for s in samples],
        "first_token": samples[-1].first_token if samples else None,
    }


def minimum_budget(card: CacheCard, group_size: int) -> float:
    """Return the smallest budget that the allocator accepts for this card's rows (every row at 2 bits).

    Keys are counted in the default channel layout, block headers included.
    """
    narrowest = min(codec.WIDTHS)
    payload = 0
    for section in card.sections:
        bits = np.full(section.n_cells, narrowest, dtype=np.uint8)
        for layer in section.layers:
            k_bytes = codec.channel_bytes(bits, section.positions, layer.n_embd_k, DEFAULT_K_BLOCK)
            v_bytes = codec.row_bytes(narrowest, layer.n_embd_v, group_size) * section.n_cells
            payload += k_bytes + v_bytes + 2 * section.n_cells  # one width tag per K row and per V row
    # Rounded up to 1/1000 bit so the allocator's integer byte budget covers every row.
    return math.ceil(8000.0 * payload / card.n_elements) / 1000.0


# -- one context --------------------------------------------------------------


ProgressCallback = Callable[[str], None]


def count_steps(config: TtftConfig) -> int:
    """Number of progress steps of a run (for a progress bar)."""
    specs = path_specs(config.budgets, config.controller)
    fast = len(specs) - 1
    n_exports = len(specs) - 1
    total = 0
    for n in config.contexts:
        total += 1 + n_exports * config.repeats + fast * (config.repeats + 1) + config.reprefill_samples(n)
        total += 4 if config.memory else 0
    return total


@dataclass
class _ContextFiles:
    state: Path
    cards: dict[str, Path]


def _sender_phase(
    config: TtftConfig,
    specs: list[PathSpec],
    n_tokens: int,
    work: Path,
    step: ProgressCallback,
) -> tuple[dict[str, Any], _ContextFiles, list[int], list[int], Sample]:
    """Read the context, write the state file and the cards, and time the exports."""
    n_ctx = config.n_ctx(n_tokens)
    sender = _new_llama(config, n_ctx)
    try:
        context = build_context_tokens(sender, n_tokens)
        follow_up = _follow_up_tokens(sender, config.follow_up_tokens)
        _warm_up(sender, context)
        start = _now()
        sender.eval(context)
        prefill_ms = _ms(start, _now())
        step(f"{n_tokens} tokens: sender prefill")

        files = _ContextFiles(work / f"ctx{n_tokens}.state", {})
        exports: dict[str, dict[str, Any]] = {}
        budgets_used: dict[str, float] = {}
        # An untimed lossless export warms the export path up and gives the smallest budget
        # the allocator accepts (every row at 2 bits with its group scales and width tag).
        probe_card = sender.export_card(budget=16.0, n_threads=config.threads)
        min_budget = minimum_budget(probe_card, probe_card.group_size)
        del probe_card
        for spec in specs:
            if spec.kind == REPREFILL:
                continue
            totals: list[float] = []
            stage_samples: list[dict[str, float]] = []
            for _ in range(config.repeats):
                if spec.kind == STATE:
                    ms = _save_state_file(sender, files.state, context)
                    totals.append(ms)
                    stage_samples.append({"save_file": ms})
                else:
                    budget = max(spec.budget, min_budget)
                    path = work / f"ctx{n_tokens}-{spec.name}.qkvc"
                    t0 = _now()
                    card = sender.export_card(budget=budget, controller=spec.controller, n_threads=config.threads)
                    t1 = _now()
                    card.save(path)
                    t2 = _now()
                    timing = sender.last_export_timing
                    assert timing is not None
                    stages = {name: timing.stages_ms.get(name, 0.0) for name in EXPORT_STAGES_CARD[:-1]}
                    stages["write"] = _ms(t1, t2)
                    totals.append(_ms(t0, t2))
                    stage_samples.append(stages)
                    files.cards[spec.name] = path
                    budgets_used[spec.name] = budget
                step(f"{n_tokens} tokens: export {spec.name}")
            exports[spec.name] = {
                "repeats": len(totals),
                "total_ms_median": _median(totals),
                "total_ms": [round(t, 3) for t in totals],
                "stages_ms_median": {k: _median([s[k] for s in stage_samples]) for k in spec.export_stages()},
            }

        # The sender's own first re-prefill sample: context prefill above, follow-up now.
        stages = {"prefill_context": prefill_ms}
        token = _first_token(sender, follow_up, stages)
        sender_sample = Sample(sum(stages.values()), stages, token)
        step(f"{n_tokens} tokens: sender follow-up")
        text_bytes = len(sender.detokenize(context))
    finally:
        sender.close()
    info = {
        "n_tokens": n_tokens,
        "n_ctx": n_ctx,
        "follow_up_tokens": len(follow_up),
        "text_bytes": text_bytes,
        "sender_prefill_ms": prefill_ms,
        "exports": exports,
        "budgets_used": budgets_used,
        "min_budget": min_budget,
    }
    return info, files, context, follow_up, sender_sample


def _follow_up_tokens(llm: Llama, n: int) -> list[int]:
    """Return the receiver's follow-up prompt: the demo question, cut or repeated to exactly `n` tokens."""
    base = llm.tokenize(DEMO_QUESTION.encode("utf-8"), add_bos=False)
    tokens = list(base)
    while len(tokens) < n:
        tokens += base
    return tokens[:n]


def _receiver_phase(
    config: TtftConfig,
    specs: list[PathSpec],
    n_tokens: int,
    files: _ContextFiles,
    context: list[int],
    follow_up: list[int],
    sender_sample: Sample,
    step: ProgressCallback,
) -> dict[str, list[Sample]]:
    receiver = _new_llama(config, config.n_ctx(n_tokens))
    samples: dict[str, list[Sample]] = {spec.name: [] for spec in specs}
    samples[REPREFILL].append(sender_sample)
    threads = config.threads

    def run(spec: PathSpec) -> Sample:
        _clear(receiver)
        if spec.kind == STATE:
            return _run_state(receiver, files.state, follow_up)
        if spec.kind == "card":
            return _run_card(receiver, files.cards[spec.name], follow_up, threads)
        return _run_reprefill(receiver, context, follow_up)

    try:
        _warm_up(receiver, context)
        fast = [s for s in specs if s.kind != REPREFILL]
        for spec in fast:  # untimed round: page cache, lazy imports, first-use allocations
            run(spec)
            step(f"{n_tokens} tokens: warm-up {spec.name}")
        extra_reprefill = config.reprefill_samples(n_tokens) - 1
        for rep in range(max(config.repeats, extra_reprefill)):
            order = fast[rep % len(fast) :] + fast[: rep % len(fast)] if rep < config.repeats else []
            if rep < extra_reprefill:
                order = [specs[0], *order]
            for spec in order:
                samples[spec.name].append(run(spec))
                step(f"{n_tokens} tokens: {spec.name} run {rep + 1}")
    finally:
        _clear(receiver)
        receiver.close()
    return samples


# -- memory probes --------------------------------------------------------------


def _read_status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise OSError(f"{name} not in /proc/self/status")


@contextmanager
def _peak_rss() -> Iterator[dict[str, int]]:
    """Measure the peak resident memory added inside the block, in bytes (Linux only)."""
    result: dict[str, int] = {}
    Path("/proc/self/clear_refs").write_text("5")  # reset the high water mark to the current RSS
    before = _read_status_kib("VmRSS")
    yield result
    result["extra_bytes"] = max(0, _read_status_kib("VmHWM") - before) * 1024


def _probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one export or import in this (fresh) process and return its peak extra memory."""
    import gc

    llm = Llama(
        spec["model_path"],
        n_ctx=spec["n_ctx"],
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        flash_attn=spec["flash_attn"],
        verbose=False,
    )
    # Clearing with data=True writes every page of the KV buffer, so the cache's own
    # memory is resident before the baseline and is not counted as extra.
    _clear(llm)
    op = spec["op"]
    state_path = Path(spec["state_path"])
    if op in ("export", "save"):
        _load_state_file(llm, state_path)
    gc.collect()
    with _peak_rss() as peak:
        if op == "export":
            card = llm.export_card(budget=spec["budget"], controller=spec["controller"], n_threads=spec["threads"])
            card.save(spec["out_path"])
        elif op == "import":
            llm.import_card(CacheCard.load(spec["card_path"]), n_threads=spec["threads"])
        elif op == "save":
            _save_state_file(llm, Path(spec["out_path"]), llm.input_ids[: llm.n_tokens].tolist())
        elif op == "load":
            _load_state_file(llm, state_path)
        else:
            raise ValueError(f"unknown probe {op!r}")
    llm.close()
    return {"op": op, "extra_bytes": peak["extra_bytes"]}


def _run_probe(spec: dict[str, Any]) -> int | None:
    command = [sys.executable, "-m", "qkvshare_edge.bench_ttft", json.dumps(spec)]
    # A neutral working directory: `-m` puts it first on sys.path, and a source
    # checkout there (without its compiled extension) would shadow the installed package.
    # The child must import this same package, also when it runs from a checkout on PYTHONPATH.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=600, cwd=tempfile.gettempdir(), env=env
    )
    if proc.returncode != 0:
        logger.warning("memory probe %s failed (exit %d): %s", spec["op"], proc.returncode, proc.stderr.strip()[-400:])
        return None
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"])


def _memory_phase(
    config: TtftConfig, n_tokens: int, files: _ContextFiles, kv_f16_bytes: int, work: Path, step: ProgressCallback
) -> dict[str, Any]:
    base = {
        "model_path": str(Path(config.model_path).resolve()),
        "n_ctx": config.n_ctx(n_tokens),
        "threads": config.threads,
        "flash_attn": config.flash_attn,
        "state_path": str(files.state.resolve()),
        "card_path": str(files.cards[CARD_DEFAULT].resolve()),
        "budget": DEFAULT_BUDGET_BITS,
        "controller": DEFAULT_CONTROLLER,
    }
    out: dict[str, Any] = {"kv_f16_bytes": kv_f16_bytes, "method": "VmHWM - VmRSS in a fresh process"}
    names = {
        "export": "card_export",
        "import": "card_import",
        "save": "state_save",
        "load": "state_load",
    }
    for op, name in names.items():
        value = _run_probe({**base, "op": op, "out_path": str((work / f"probe-{n_tokens}-{op}.out").resolve())})
        out[f"{name}_extra_bytes"] = value
        out[f"{name}_over_kv"] = None if value is None else value / kv_f16_bytes
        step(f"{n_tokens} tokens: memory {name}")
    return out


# -- whole run -----------------------------------------------------------------


def run_ttft(
    config: TtftConfig,
    step: ProgressCallback | None = None,
    on_context: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its JSON-ready result.

    Args:
        config: the run's settings.
        step: called after each measurement (for a progress bar).
        on_context: called with the result so far after each context, so a long run
            can save partial results.
    """
    step = step or (lambda _message: None)
    specs = path_specs(config.budgets, config.controller)
    result: dict[str, Any] = {
        "benchmark": "ttft",
        "command": config.command,
        "model": config.model_name,
        "model_path": config.model_path,
        "environment": environment(config.threads),
        "settings": {
            "contexts": config.contexts,
            "repeats": config.repeats,
            "reprefill_repeats": config.reprefill_repeats,
            "reprefill_repeats_long": config.reprefill_repeats_long,
            "long_context": LONG_CONTEXT,
            "follow_up_tokens": config.follow_up_tokens,
            "threads": config.threads,
            "flash_attn": config.flash_attn,
            "cache_type": "f16",
            "first_token": "greedy argmax of the last logits",
        },
        "paths": [
            {"name": s.name, "kind": s.kind, "budget": s.budget or None, "controller": s.controller or None}
            for s in specs
        ],
        "contexts": [],
        "skipped_contexts": [],
    }
    with tempfile.TemporaryDirectory(prefix="qkvedge-bench-") as tmp:
        work = config.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for n_tokens in config.contexts:
            started = _now()
            try:
                info, files, context, follow_up, sender_sample = _sender_phase(config, specs, n_tokens, work, step)
                samples = _receiver_phase(config, specs, n_tokens, files, context, follow_up, sender_sample, step)
            except ContextUnavailableError as exc:
                logger.warning("context %d skipped: %s", n_tokens, exc)
                result["skipped_contexts"].append({"n_tokens": n_tokens, "reason": str(exc)})
                continue
            entry = _context_entry(info, specs, files, samples)
            if config.memory:
                entry["memory"] = _memory_phase(config, n_tokens, files, entry["kv_f16_bytes"], work, step)
            entry["wall_s"] = _ms(started, _now()) / 1e3
            entry["load_average_end"] = load_average()
            result["contexts"].append(entry)
            if on_context is not None:
                on_context(_finish(result, config, partial=True))
    return _finish(result, config, partial=False)


def _finish(result: dict[str, Any], config: TtftConfig, *, partial: bool) -> dict[str, Any]:
    result["partial"] = partial
    result["environment"]["load_average_end"] = load_average()
    result["link"] = link_model(result, config.link_mbps)
    result["targets"] = evaluate_targets(result)
    return result


def _context_entry(
    info: dict[str, Any], specs: list[PathSpec], files: _ContextFiles, samples: dict[str, list[Sample]]
) -> dict[str, Any]:
    n_tokens = info["n_tokens"]
    paths: dict[str, Any] = {}
    default_card = CacheCard.load(files.cards[CARD_DEFAULT])
    kv_f16_bytes = 2 * default_card.n_elements
    for spec in specs:
        entry = _summarize(samples[spec.name], spec.import_stages())
        entry["kind"] = spec.kind
        if spec.kind == STATE:
            entry["bytes"] = files.state.stat().st_size
        elif spec.kind == "card":
            card_path = files.cards[spec.name]
            card = default_card if spec.name == CARD_DEFAULT else CacheCard.load(card_path)
            entry["bytes"] = card_path.stat().st_size
            entry["budget_requested"] = spec.budget
            entry["budget"] = info["budgets_used"][spec.name]
            entry["controller"] = spec.controller
            entry["bits_per_element"] = card.bits_per_element
            entry["payload_bytes"] = card.payload_bytes
            entry["width_histogram"] = {str(k): v for k, v in card.width_histogram().items()}
        else:
            entry["bytes"] = info["text_bytes"]
        entry["bytes_per_token"] = entry["bytes"] / n_tokens
        if spec.name in info["exports"]:
            entry["export"] = info["exports"][spec.name]
        paths[spec.name] = entry
    reprefill = paths[REPREFILL]["ttft_ms_median"]
    state_ttft = paths[STATE]["ttft_ms_median"]
    for entry in paths.values():
        entry["speedup_vs_reprefill"] = reprefill / entry["ttft_ms_median"]
        entry["ratio_to_state"] = entry["ttft_ms_median"] / state_ttft
    return {
        "n_tokens": n_tokens,
        "n_ctx": info["n_ctx"],
        "follow_up_tokens": info["follow_up_tokens"],
        "text_bytes": info["text_bytes"],
        "kv_f16_bytes": kv_f16_bytes,
        "sender_prefill_ms": info["sender_prefill_ms"],
        "min_budget": info["min_budget"],
        "paths": paths,
    }


# -- link model --------------------------------------------------------------------


def handoff_ms(path: dict[str, Any], mbps: float) -> float:
    """Sender export + transfer of the path's bytes at `mbps` + receiver TTFT, in ms."""
    export_ms = path["export"]["total_ms_median"] if "export" in path else 0.0
    transfer_ms = path["bytes"] * 8.0 / (mbps * 1e6) * 1e3
    return export_ms + transfer_ms + path["ttft_ms_median"]


def crossover_mbps(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Link speed in Mbit/s at which paths a and b take the same handoff time, or None if they never do."""
    fixed_a = handoff_ms(a, math.inf)
    fixed_b = handoff_ms(b, math.inf)
    bits_a, bits_b = 8.0 * a["bytes"], 8.0 * b["bytes"]
    if fixed_a == fixed_b or bits_a == bits_b:
        return None
    # fixed_a + bits_a / B = fixed_b + bits_b / B, with B in bits per ms.
    bits_per_ms = (bits_a - bits_b) / (fixed_b - fixed_a)
    if bits_per_ms <= 0:
        return None
    return bits_per_ms * 1e3 / 1e6


def link_model(result: dict[str, Any], link_mbps: list[float]) -> dict[str, Any]:
    """Handoff time per path at the given link speeds, and the crossover points between paths."""
    out: dict[str, Any] = {
        "model": "export + bytes / link + receiver TTFT; re-prefill sends the context text (UTF-8)",
        "mbps": link_mbps,
        "contexts": [],
    }
    for ctx in result["contexts"]:
        paths = ctx["paths"]
        table = {name: [handoff_ms(p, mbps) for mbps in link_mbps] for name, p in paths.items()}
        crossings = []
        names = list(paths)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if a.startswith("card-") and b.startswith("card-"):
                    continue
                mbps = crossover_mbps(paths[a], paths[b])
                faster_below = None
                if mbps is not None:
                    faster_below = a if paths[a]["bytes"] < paths[b]["bytes"] else b
                crossings.append({"a": a, "b": b, "mbps": mbps, "faster_below": faster_below})
        out["contexts"].append({"n_tokens": ctx["n_tokens"], "handoff_ms": table, "crossovers": crossings})
    return out


# -- targets -----------------------------------------------------------------------


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Check this run against the TTFT, export-time and peak-memory targets."""
    targets: list[dict[str, Any]] = []
    for ctx in result["contexts"]:
        n = ctx["n_tokens"]
        for name, path in ctx["paths"].items():
            if path["kind"] != "card":
                continue
            ratio = path["ratio_to_state"]
            targets.append(
                {
                    "target": "card TTFT <= 1.15 x llama.cpp state TTFT",
                    "context": n,
                    "path": name,
                    "value": ratio,
                    "limit": TARGET_CARD_OVER_STATE,
                    "met": ratio <= TARGET_CARD_OVER_STATE,
                }
            )
        if n == TARGET_EXPORT_CONTEXT:
            for name, path in ctx["paths"].items():
                if path["kind"] == "card":
                    value = path["export"]["total_ms_median"]
                    targets.append(
                        {
                            "target": "8K card export (with write) <= 60 ms",
                            "context": n,
                            "path": name,
                            "value": value,
                            "limit": TARGET_EXPORT_MS_8K,
                            "met": value <= TARGET_EXPORT_MS_8K,
                        }
                    )
        if n == TARGET_EXPORT_CONTEXT and CARD_DEFAULT in ctx["paths"] and REPREFILL in ctx["paths"]:
            prefill_ms = ctx["paths"][REPREFILL]["stages_ms_median"].get("prefill_context") or ctx["sender_prefill_ms"]
            ratio = ctx["paths"][CARD_DEFAULT]["export"]["total_ms_median"] / prefill_ms
            targets.append(
                {
                    "target": f"8K export of the default card ({DEFAULT_CONTROLLER}) <= 25% of re-prefill",
                    "context": n,
                    "path": CARD_DEFAULT,
                    "value": ratio,
                    "limit": TARGET_EXPORT_OVER_PREFILL,
                    "met": ratio <= TARGET_EXPORT_OVER_PREFILL,
                }
            )
        memory = ctx.get("memory")
        if memory:
            for key, label in (("card_export", "export"), ("card_import", "import")):
                over = memory.get(f"{key}_over_kv")
                if over is None:
                    continue
                targets.append(
                    {
                        "target": f"peak extra memory of {label} <= 2 x f16 K/V",
                        "context": n,
                        "path": CARD_DEFAULT,
                        "value": over,
                        "limit": TARGET_MEMORY_OVER_KV,
                        "met": over <= TARGET_MEMORY_OVER_KV,
                    }
                )
    return targets


# -- reports -----------------------------------------------------------------------


def _fmt_ms(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt_ratio(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def _path_label(path: dict[str, Any], name: str) -> str:
    if path["kind"] == "card":
        return f"{name} ({path['controller']}, {path['budget']:g})"
    return name


def markdown_report(result: dict[str, Any]) -> str:
    """Render the result as Markdown tables."""
    env = result["environment"]
    settings = result["settings"]
    lines = [
        "# qkvedge bench ttft" + (" (partial: the run has not finished)" if result.get("partial") else ""),
        "",
        f"- command: `{result['command']}`",
        f"- machine: {env['machine']}; {env['os']}",
        f"- load average (1, 5, 15 min) at start {env.get('load_average_start')}, at end {env.get('load_average_end')}",
        f"- threads: {settings['threads']}; flash attention {'on' if settings['flash_attn'] else 'off'}; "
        f"K/V cache {settings['cache_type']}",
        f"- model: {result['model']} (`{Path(result['model_path']).name}`)",
        f"- llama-cpp-python {env['llama_cpp_python']} (llama.cpp {env['llama_cpp']}, ggml {env['ggml']}); "
        f"qkvshare_edge {env['qkvshare_edge']}",
        f"- repeats: {settings['repeats']} for the state and card paths and their exports; re-prefill "
        f"{settings['reprefill_repeats']} below {settings['long_context']} tokens, "
        f"{settings['reprefill_repeats_long']} at or above; values are medians",
        f"- follow-up: {settings['follow_up_tokens']} tokens; first token: {settings['first_token']}",
        "",
        "## Receiver time to first token",
        "",
        "| context | path | TTFT ms (median) | runs | x faster than re-prefill | / state TTFT | bytes "
        "| bytes/token | export ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ctx in result["contexts"]:
        for name, p in ctx["paths"].items():
            export = _fmt_ms(p["export"]["total_ms_median"]) if "export" in p else "-"
            lines.append(
                f"| {ctx['n_tokens']} | {_path_label(p, name)} | {_fmt_ms(p['ttft_ms_median'])} | {p['repeats']} "
                f"| {_fmt_ratio(p['speedup_vs_reprefill'])} | {p['ratio_to_state']:.2f} | {p['bytes']:,} "
                f"| {p['bytes_per_token']:,.0f} | {export} |"
            )
    lines += ["", "Re-prefill 'bytes' are the context text that re-prefill would send instead.", ""]
    lines += [
        "Wall time and 1-minute load average at the end of each context: "
        + ", ".join(
            f"{c['n_tokens']} tokens {c.get('wall_s', 0):.0f} s, load {(c.get('load_average_end') or ['?'])[0]}"
            for c in result["contexts"]
        ),
        "",
    ]

    lines += ["## Receiver stages (median ms)", ""]
    stage_names = [*IMPORT_STAGES_CARD, "load_file", "prefill_context"]
    lines.append("| context | path | " + " | ".join(stage_names) + " |")
    lines.append("|---:|---|" + "---:|" * len(stage_names))
    for ctx in result["contexts"]:
        for name, p in ctx["paths"].items():
            cells = [_fmt_ms(p["stages_ms_median"][s]) if s in p["stages_ms_median"] else "" for s in stage_names]
            lines.append(f"| {ctx['n_tokens']} | {name} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += ["## Sender export stages (median ms)", ""]
    export_names = list(EXPORT_STAGES_CARD) + list(EXPORT_STAGES_STATE)
    lines.append("| context | path | total | " + " | ".join(export_names) + " |")
    lines.append("|---:|---|---:|" + "---:|" * len(export_names))
    for ctx in result["contexts"]:
        for name, p in ctx["paths"].items():
            if "export" not in p:
                continue
            ex = p["export"]
            cells = [_fmt_ms(ex["stages_ms_median"][s]) if s in ex["stages_ms_median"] else "" for s in export_names]
            lines.append(
                f"| {ctx['n_tokens']} | {name} | {_fmt_ms(ex['total_ms_median'])} | " + " | ".join(cells) + " |"
            )
    lines.append("")

    if any("memory" in ctx for ctx in result["contexts"]):
        lines += [
            "## Peak extra memory",
            "",
            "Resident-set high water mark above the level before the operation, in a fresh process "
            f"({CARD_DEFAULT} card; llama.cpp state file for comparison).",
            "",
            "| context | f16 K/V bytes | card export | card import | state save | state load |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for ctx in result["contexts"]:
            m = ctx.get("memory")
            if not m:
                continue
            cells = []
            for key in ("card_export", "card_import", "state_save", "state_load"):
                value = m.get(f"{key}_extra_bytes")
                cells.append("n/a" if value is None else f"{value / 2**20:.1f} MiB ({m[f'{key}_over_kv']:.2f}x)")
            lines.append(f"| {ctx['n_tokens']} | {m['kv_f16_bytes'] / 2**20:.1f} MiB | " + " | ".join(cells) + " |")
        lines.append("")

    link = result.get("link")
    if link and link["contexts"]:
        lines += ["## Link model", "", f"Handoff time in ms = {link['model']}.", ""]
        names = list(result["contexts"][0]["paths"])
        lines.append("| context | link Mbit/s | " + " | ".join(names) + " |")
        lines.append("|---:|---:|" + "---:|" * len(names))
        for ctx in link["contexts"]:
            for i, mbps in enumerate(link["mbps"]):
                cells = [_fmt_ms(ctx["handoff_ms"][name][i]) for name in names]
                lines.append(f"| {ctx['n_tokens']} | {mbps:g} | " + " | ".join(cells) + " |")
        lines += ["", "Crossover link speeds (Mbit/s) of the default card:", ""]
        lines.append("| context | card-default vs state | card-default vs re-prefill | state vs re-prefill |")
        lines.append("|---:|---|---|---|")
        for ctx in link["contexts"]:
            cells = []
            for a, b in ((STATE, CARD_DEFAULT), (REPREFILL, CARD_DEFAULT), (REPREFILL, STATE)):
                cells.append(_crossing_text(ctx["crossovers"], a, b))
            lines.append(f"| {ctx['n_tokens']} | " + " | ".join(cells) + " |")
        lines.append("")

    if result.get("targets"):
        lines += [
            "## Targets",
            "",
            "| target | context | path | value | limit | result |",
            "|---|---:|---|---:|---:|---|",
        ]
        for t in result["targets"]:
            lines.append(
                f"| {t['target']} | {t['context']} | {t['path']} | {t['value']:.2f} | {t['limit']:g} "
                f"| {'met' if t['met'] else 'MISSED'} |"
            )
        lines.append("")
    for skipped in result.get("skipped_contexts", []):
        lines.append(f"Context {skipped['n_tokens']} was skipped: {skipped['reason']}")
    return "\n".join(lines).rstrip() + "\n"


def _crossing_text(crossings: list[dict[str, Any]], a: str, b: str) -> str:
    for c in crossings:
        if {c["a"], c["b"]} == {a, b}:
            if c["mbps"] is None:
                return "none"
            return f"{c['mbps']:,.3g} ({c['faster_below']} faster below)"
    return "-"


def write_plots(result: dict[str, Any], out_dir: Path, prefix: str = "ttft") -> list[Path]:
    """Write the TTFT, stage and link plots as PNG and return their paths (an empty list without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no plots were written; pip install matplotlib")
        return []
    contexts = result["contexts"]
    if not contexts:
        return []
    written: list[Path] = []
    names = list(contexts[0]["paths"])
    caption = f"{result['model']}, {result['environment']['threads']} threads, {result['environment']['cpu']}"

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [c["n_tokens"] for c in contexts]
    for name in names:
        ax.plot(xs, [c["paths"][name]["ttft_ms_median"] for c in contexts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("receiver TTFT, ms (median)")
    ax.set_title(f"Receiver time to first token\n{caption}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / f"{prefix}-latency.png"))

    # Stages at the export-target context (8K) when it was measured, and at the largest context.
    plotted = [c for c in contexts if c["n_tokens"] == TARGET_EXPORT_CONTEXT and c is not contexts[-1]]
    plotted.append(contexts[-1])
    fig, axes = plt.subplots(len(plotted), 2, figsize=(13, 4.2 * len(plotted)), squeeze=False)
    fast = [n for n in names if n != REPREFILL]
    for (ax1, ax2), ctx in zip(axes, plotted, strict=True):
        _stacked(ax1, fast, [ctx["paths"][n]["stages_ms_median"] for n in fast])
        ax1.set_title(f"Receiver stages at {ctx['n_tokens']} tokens (median ms)", fontsize=10)
        _stacked(ax2, fast, [ctx["paths"][n]["export"]["stages_ms_median"] for n in fast])
        ax2.set_title(f"Sender export stages at {ctx['n_tokens']} tokens (median ms)", fontsize=10)
    fig.suptitle(caption, fontsize=9)
    written.append(_save(fig, out_dir / f"{prefix}-stages.png"))

    link = result["link"]["contexts"]
    n_cols = min(3, len(link))
    n_rows = math.ceil(len(link) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5 * n_cols, 4 * n_rows), squeeze=False)
    mbps = np.logspace(math.log10(LINK_RANGE_MBPS[0]), math.log10(LINK_RANGE_MBPS[1]), 200)
    for ax, lctx, ctx in zip(axes.flat, link, contexts, strict=False):
        for name in names:
            ax.plot(mbps, [handoff_ms(ctx["paths"][name], m) for m in mbps], label=name)
        for c in lctx["crossovers"]:
            if c["mbps"] is None or not LINK_RANGE_MBPS[0] <= c["mbps"] <= LINK_RANGE_MBPS[1]:
                continue
            if CARD_DEFAULT in (c["a"], c["b"]) or {c["a"], c["b"]} == {STATE, REPREFILL}:
                y = handoff_ms(ctx["paths"][c["a"]], c["mbps"])
                ax.plot([c["mbps"]], [y], "ko", ms=5)
                ax.annotate(f"{c['mbps']:.3g}", (c["mbps"], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{ctx['n_tokens']} tokens", fontsize=10)
        ax.set_xlabel("link, Mbit/s")
        ax.set_ylabel("handoff to first token, ms")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(link) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        f"Handoff time over a link (dots: crossovers of card-default, state, re-prefill)\n{caption}", fontsize=9
    )
    written.append(_save(fig, out_dir / f"{prefix}-link.png"))
    return written


# Stages in the order they happen, for the stacked bars.
_STAGE_ORDER = ("load_file", "save_file", *EXPORT_STAGES_CARD[:-1], *IMPORT_STAGES_CARD[:-2], "write")


def _stacked(ax: Any, labels: list[str], stages: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for s in stages:
        keys += [k for k in s if k not in keys]
    keys.sort(key=lambda k: _STAGE_ORDER.index(k) if k in _STAGE_ORDER else len(_STAGE_ORDER))
    left = np.zeros(len(labels))
    for key in keys:
        values = np.array([s.get(key, 0.0) for s in stages])
        ax.barh(labels, values, left=left, label=key)
        left += values
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    """Entry point of the memory probe child process."""
    if len(argv) != 1:
        sys.stderr.write("usage: python -m qkvshare_edge.bench_ttft PROBE_JSON\n")
        return 2
    sys.stdout.write(json.dumps(_probe(json.loads(argv[0]))) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
