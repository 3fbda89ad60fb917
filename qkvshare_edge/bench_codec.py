"""`qkvedge bench codec`: native codec throughput against memcpy of the same bytes.

Throughput is counted in GB/s (1e9 bytes) of f16 K/V: the f16 size of the
rows, which is the encoder's input and the decoder's output in a handoff
(the codec itself takes and returns float32). Each width is measured with one
thread and with all threads, and so is the reference, `np.copyto` of the f16
rows into a preallocated array. For all threads the copy is split over a
thread pool, because numpy releases the GIL while it copies. Every run is
timed in the same process, interleaved, and the medians are compared.

The decoder returns a new array per call, so its time includes first-touch
page faults of that output; `np.copy` into a new array is reported as a
second reference that pays the same cost.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import codec
from .allocation import RowGroup, allocate
from .bench_ttft import environment, load_average

logger = logging.getLogger(__name__)

MIXED = "mixed"
# Mixed allocation: the allocator's choice at this budget for log-normal row scores.
MIXED_BUDGET = 4.0
MIXED_SCORE_SIGMA = 1.5
# Targets per thread: decode at least half of memcpy's speed, encode at least a quarter.
TARGET_DECODE_OVER_MEMCPY = 0.5
TARGET_ENCODE_OVER_MEMCPY = 0.25


@dataclass
class CodecConfig:
    """Settings of one `bench codec` run."""

    mib: float = 32.0  # f16 size of the rows
    row_size: int = 256
    group_size: int = codec.DEFAULT_GROUP_SIZE
    repeats: int = 7
    threads: int = 0  # 0: every core
    seed: int = 0
    command: str = ""

    @property
    def n_rows(self) -> int:
        return max(1, round(self.mib * 2**20 / (2 * self.row_size)))

    def all_threads(self) -> int:
        import os

        return self.threads if self.threads > 0 else (os.cpu_count() or 1)


def make_rows(config: CodecConfig) -> np.ndarray:
    """Return the benchmark's float32 rows: seeded normal values, like K/V of unit scale."""
    rng = np.random.default_rng(config.seed)
    return rng.standard_normal((config.n_rows, config.row_size), dtype=np.float32)


def make_widths(config: CodecConfig) -> dict[str, np.ndarray]:
    """Return the per-row widths of each workload: one per codec width, and the mixed allocation."""
    n_rows = config.n_rows
    workloads = {str(bits): np.full(n_rows, bits, dtype=np.uint8) for bits in codec.WIDTHS}
    rng = np.random.default_rng(config.seed + 1)
    scores = rng.lognormal(0.0, MIXED_SCORE_SIGMA, n_rows)
    workloads[MIXED] = allocate([RowGroup(config.row_size, scores)], MIXED_BUDGET, config.group_size)[0]
    return workloads


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _gbps(n_bytes: int, seconds: float) -> float:
    return n_bytes / seconds / 1e9 if seconds > 0 else math.inf


class _ParallelCopy:
    """Copier that splits np.copyto over a thread pool, one chunk per thread."""

    def __init__(self, dst: np.ndarray, src: np.ndarray, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        bounds = np.linspace(0, src.shape[0], threads + 1).astype(int)
        self._chunks = [(dst[a:b], src[a:b]) for a, b in itertools.pairwise(bounds) if b > a]

    def __call__(self) -> None:
        if self._pool is None:
            for d, s in self._chunks:
                np.copyto(d, s)
            return
        for future in [self._pool.submit(np.copyto, d, s) for d, s in self._chunks]:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def run_codec(
    config: CodecConfig,
    step: Callable[[str], None] | None = None,
    keep_arrays: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its JSON-ready result.

    Args:
        config: sizes, repeats and threads.
        step: called after each measurement (for a progress bar).
        keep_arrays: if given, receives the rows, and each workload's widths,
            payload and decoded output (from the all-threads run).
    """
    step = step or (lambda _message: None)
    x = make_rows(config)
    workloads = make_widths(config)
    n_elements = x.size
    f16_bytes = 2 * n_elements
    thread_counts = sorted({1, config.all_threads()})
    src16 = x.astype(np.float16)
    dst16 = np.empty_like(src16)
    if keep_arrays is not None:
        keep_arrays["rows"] = x

    copiers = {t: _ParallelCopy(dst16, src16, t) for t in thread_counts}
    memcpy_samples: dict[int, list[float]] = {t: [] for t in thread_counts}
    results: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    try:
        for copier in copiers.values():
            copier()  # warm-up: touches the destination pages once
        for name, bits in workloads.items():
            per_threads: dict[str, Any] = {}
            payloads: dict[int, np.ndarray] = {}
            outputs: dict[int, np.ndarray] = {}
            for threads in thread_counts:
                payload = codec.encode(x, bits, config.group_size, threads)  # warm-up
                codec.decode(payload, bits, config.row_size, config.group_size, threads)
                copy_s, enc_s, dec_s = [], [], []
                # memcpy, encode and decode take turns, so drifting machine load hits all three alike.
                for _ in range(config.repeats):
                    copy_s.append(_time(copiers[threads]))
                    start = time.perf_counter()
                    payload = codec.encode(x, bits, config.group_size, threads)
                    enc_s.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    decoded = codec.decode(payload, bits, config.row_size, config.group_size, threads)
                    dec_s.append(time.perf_counter() - start)
                memcpy_samples[threads] += copy_s
                payloads[threads], outputs[threads] = payload, decoded
                reference = _gbps(f16_bytes, statistics.median(copy_s))
                encode_gbps = _gbps(f16_bytes, statistics.median(enc_s))
                decode_gbps = _gbps(f16_bytes, statistics.median(dec_s))
                per_threads[str(threads)] = {
                    "encode_seconds": statistics.median(enc_s),
                    "decode_seconds": statistics.median(dec_s),
                    "memcpy_seconds": statistics.median(copy_s),
                    "encode_gbps": encode_gbps,
                    "decode_gbps": decode_gbps,
                    "memcpy_gbps": reference,
                    "encode_over_memcpy": encode_gbps / reference,
                    "decode_over_memcpy": decode_gbps / reference,
                }
                step(f"width {name}, {threads} thread(s)")
            first, last = thread_counts[0], thread_counts[-1]
            checks[f"{name}: encode gives the same bytes with 1 and {last} threads"] = bool(
                np.array_equal(payloads[first], payloads[last])
            )
            checks[f"{name}: decode gives the same values with 1 and {last} threads"] = bool(
                np.array_equal(outputs[first], outputs[last])
            )
            if name == str(codec.LOSSLESS_WIDTH):
                checks[f"{name}: decode equals the f16 rounding of the input"] = bool(
                    np.array_equal(outputs[last], x.astype(np.float16).astype(np.float32))
                )
            histogram = {str(int(w)): int(c) for w, c in zip(*np.unique(bits, return_counts=True), strict=True)}
            results[name] = {
                "widths": histogram,
                "payload_bytes": int(payloads[last].nbytes),
                "bits_per_element": 8.0 * payloads[last].nbytes / n_elements,
                "threads": per_threads,
            }
            if keep_arrays is not None:
                keep_arrays[f"bits_{name}"] = bits
                keep_arrays[f"payload_{name}"] = payloads[last]
                keep_arrays[f"decoded_{name}"] = outputs[last]
    finally:
        for copier in copiers.values():
            copier.close()
    memcpy = {
        str(t): {"seconds": statistics.median(v), "gbps": _gbps(f16_bytes, statistics.median(v))}
        for t, v in memcpy_samples.items()
    }
    fresh_s = [_time(lambda: np.copy(src16)) for _ in range(config.repeats)]
    fresh_copy = {"seconds": statistics.median(fresh_s), "gbps": _gbps(f16_bytes, statistics.median(fresh_s))}
    step("copy into a new array")

    result: dict[str, Any] = {
        "benchmark": "codec",
        "command": config.command,
        "environment": environment(config.all_threads()),
        "settings": {
            "rows": config.n_rows,
            "row_size": config.row_size,
            "group_size": config.group_size,
            "f16_bytes": f16_bytes,
            "repeats": config.repeats,
            "thread_counts": thread_counts,
            "seed": config.seed,
            "mixed": f"allocator at budget {MIXED_BUDGET:g} for log-normal row scores (sigma {MIXED_SCORE_SIGMA:g})",
            "gb": "1e9 bytes of f16 K/V (encode input, decode output)",
            "memcpy": "np.copyto of the f16 rows into a preallocated array, split over a thread pool",
        },
        "memcpy": memcpy,
        "copy_new_array": fresh_copy,
        "workloads": results,
        "checks": checks,
    }
    result["environment"]["load_average_end"] = load_average()
    result["targets"] = evaluate_codec_targets(result)
    return result


def evaluate_codec_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per thread: decode at least half of memcpy's speed, encode at least a quarter."""
    targets = []
    for name, workload in result["workloads"].items():
        one = workload["threads"]["1"]
        for op, limit in (("decode", TARGET_DECODE_OVER_MEMCPY), ("encode", TARGET_ENCODE_OVER_MEMCPY)):
            value = one[f"{op}_over_memcpy"]
            targets.append(
                {
                    "target": f"{op} per thread >= {limit:g} x memcpy",
                    "workload": name,
                    "value": value,
                    "limit": limit,
                    "met": value >= limit,
                }
            )
    return targets


def markdown_report(result: dict[str, Any]) -> str:
    """Render the codec result as Markdown tables."""
    env = result["environment"]
    settings = result["settings"]
    threads = [str(t) for t in settings["thread_counts"]]
    lines = [
        "# qkvedge bench codec",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {env['machine']}; {env['os']}",
        f"- load average (1, 5, 15 min) at start {env.get('load_average_start')}, at end {env.get('load_average_end')}",
        f"- rows: {settings['rows']:,} of {settings['row_size']} elements, group size {settings['group_size']}, "
        f"{settings['f16_bytes'] / 2**20:.1f} MiB of f16; {settings['repeats']} repeats, medians",
        f"- GB/s: {settings['gb']}",
        f"- memcpy: {settings['memcpy']}",
        f"- mixed: {settings['mixed']}",
        "",
        "| workload | bits/element | threads | encode GB/s | decode GB/s | memcpy GB/s | encode / memcpy "
        "| decode / memcpy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    for name, w in result["workloads"].items():
        for t in threads:
            r = w["threads"][t]
            lines.append(
                f"| {name} | {w['bits_per_element']:.2f} | {t} | {r['encode_gbps']:.2f} | {r['decode_gbps']:.2f} "
                f"| {r['memcpy_gbps']:.2f} | {r['encode_over_memcpy']:.2f} | {r['decode_over_memcpy']:.2f} |"
            )

    fresh = result["copy_new_array"]
    lines += [
        "",
        f"Copy of the f16 rows into a new array (`np.copy`, 1 thread, page faults included): {fresh['gbps']:.2f} GB/s.",
        "",
        "Mixed allocation widths (rows): "
        + ", ".join(f"{bits} bits: {n:,}" for bits, n in result["workloads"][MIXED]["widths"].items()),
        "",
        "## Checks",
        "",
    ]
    lines += [f"- {name}: {'ok' if ok else 'FAILED'}" for name, ok in result["checks"].items()]

    lines += ["", "## Targets", "", "| target | workload | value | limit | result |", "|---|---|---:|---:|---|"]
    for t in result["targets"]:
        lines.append(
            f"| {t['target']} | {t['workload']} | {t['value']:.2f} | {t['limit']:g} "
            f"| {'met' if t['met'] else 'MISSED'} |"
        )
    return "\n".join(lines) + "\n"


def write_plot(result: dict[str, Any], path: Path) -> Path | None:
    """Bar chart of encode and decode GB/s per workload and thread count, with memcpy as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no plot was written; pip install matplotlib")
        return None
    names = list(result["workloads"])
    threads = [str(t) for t in result["settings"]["thread_counts"]]
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.5), squeeze=False, sharey=True)
    xs = np.arange(len(names))
    for ax, t in zip(axes.flat, threads, strict=True):
        enc = [result["workloads"][n]["threads"][t]["encode_gbps"] for n in names]
        dec = [result["workloads"][n]["threads"][t]["decode_gbps"] for n in names]
        ax.bar(xs - 0.2, enc, 0.4, label="encode")
        ax.bar(xs + 0.2, dec, 0.4, label="decode")
        ref = result["memcpy"][t]["gbps"]
        ax.axhline(ref, color="k", lw=1, label="memcpy (f16)")
        ax.axhline(ref * TARGET_DECODE_OVER_MEMCPY, color="k", lw=1, ls="--", label="decode target (1/2 memcpy)")
        ax.axhline(ref * TARGET_ENCODE_OVER_MEMCPY, color="k", lw=1, ls=":", label="encode target (1/4 memcpy)")
        ax.set_xticks(xs, [f"{n} bits" if n != MIXED else MIXED for n in names])
        ax.set_title(f"{t} thread(s)", fontsize=10)
        ax.set_ylabel("GB/s of f16 K/V")
        ax.grid(True, axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(
        f"Native codec throughput, {result['settings']['f16_bytes'] / 2**20:.0f} MiB f16\n{env['cpu']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
