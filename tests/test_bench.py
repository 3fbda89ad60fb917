"""Smoke tests of `qkvedge bench ttft` and `qkvedge bench codec` on tiny inputs.

They check that what the benchmarks measure and report is consistent (every
path and stage present, byte counts equal to the files, ratios equal to the
medians, decoded values equal to the reference codec), not how fast anything is.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import codec_reference as ref
import numpy as np
import pytest
from typer.testing import CliRunner

from qkvshare_edge import bench_ttft
from qkvshare_edge.cli import app

CONTEXTS = (48, 96)
REPEATS = 2
REPREFILL_REPEATS = 2
FOLLOW_UP = 8


@pytest.fixture(scope="module")
def ttft_run(tmp_path_factory: pytest.TempPathFactory, gemma3_path: Path) -> tuple[dict[str, Any], Path, Path]:
    """One small `bench ttft` run on the tiny Gemma 3 model (two KV caches: full and sliding window)."""
    root = tmp_path_factory.mktemp("bench-ttft")
    out, work = root / "out", root / "work"
    args = [
        "bench",
        "ttft",
        "--model",
        str(gemma3_path),
        "--contexts",
        ",".join(str(n) for n in CONTEXTS),
        "--repeats",
        str(REPEATS),
        "--reprefill-repeats",
        str(REPREFILL_REPEATS),
        "--follow-up",
        str(FOLLOW_UP),
        "--link-mbps",
        "1,100",
        # One thread: two llama.cpp threads stall badly when other processes share the two cores.
        "--threads",
        "1",
        "--out",
        str(out),
        "--work-dir",
        str(work),
        "--quiet",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "ttft.json").read_text())
    return data, out, work


def _paths() -> list[bench_ttft.PathSpec]:
    return bench_ttft.path_specs()


def test_ttft_json_lists_paths_and_stages(ttft_run: tuple[dict[str, Any], Path, Path]) -> None:
    data, _, _ = ttft_run
    assert [c["n_tokens"] for c in data["contexts"]] == list(CONTEXTS)
    assert data["skipped_contexts"] == []
    assert data["partial"] is False
    for key in ("machine", "threads", "llama_cpp_python", "llama_cpp", "ggml"):
        assert data["environment"][key], key
    assert data["settings"]["threads"] == 1
    for ctx in data["contexts"]:
        assert ctx["follow_up_tokens"] == FOLLOW_UP
        assert ctx["wall_s"] > 0
        assert set(ctx["paths"]) == {spec.name for spec in _paths()}
        for spec in _paths():
            path = ctx["paths"][spec.name]
            expected_runs = REPREFILL_REPEATS if spec.kind == bench_ttft.REPREFILL else REPEATS
            assert path["repeats"] == len(path["samples"]) == expected_runs, spec.name
            assert set(path["stages_ms_median"]) == set(spec.import_stages())
            for sample in path["samples"]:
                assert set(sample["stages_ms"]) == set(spec.import_stages())
                assert all(v >= 0 for v in sample["stages_ms"].values())
                # The stages are disjoint parts of the timed interval.
                assert sum(sample["stages_ms"].values()) <= sample["ttft_ms"] + 1e-6
            if spec.kind != bench_ttft.REPREFILL:
                export = path["export"]
                assert export["repeats"] == REPEATS
                assert set(export["stages_ms_median"]) == set(spec.export_stages())
                assert math.isclose(export["total_ms_median"], statistics.median(export["total_ms"]), abs_tol=1e-3)


def test_ttft_bytes_match_files(ttft_run: tuple[dict[str, Any], Path, Path]) -> None:
    data, _, work = ttft_run
    for ctx in data["contexts"]:
        n = ctx["n_tokens"]
        paths = ctx["paths"]
        assert paths["state"]["bytes"] == (work / f"ctx{n}.state").stat().st_size
        for spec in _paths():
            if spec.kind != "card":
                continue
            path = paths[spec.name]
            assert path["bytes"] == (work / f"ctx{n}-{spec.name}.qkvc").stat().st_size, spec.name
            assert path["bytes_per_token"] == pytest.approx(path["bytes"] / n)
            if path["budget"] < 16:
                assert path["bits_per_element"] <= path["budget"] + 1e-9
            assert path["budget"] == max(path["budget_requested"], ctx["min_budget"])
        # Lower budgets give smaller cards, and width tags put a lossless card just above 16 bits.
        sizes = [paths[f"card-b{b:g}"]["bytes"] for b in bench_ttft.CARD_BUDGETS]
        assert sizes == sorted(sizes, reverse=True)
        assert paths["card-b16"]["bits_per_element"] > 16


def test_ttft_ratios_match_medians(ttft_run: tuple[dict[str, Any], Path, Path]) -> None:
    data, _, _ = ttft_run
    for ctx in data["contexts"]:
        paths = ctx["paths"]
        for name, path in paths.items():
            assert path["ttft_ms_median"] == pytest.approx(statistics.median(path["ttft_ms"]), abs=1e-3), name
            assert path["speedup_vs_reprefill"] == pytest.approx(
                paths["reprefill"]["ttft_ms_median"] / path["ttft_ms_median"]
            )
            assert path["ratio_to_state"] == pytest.approx(path["ttft_ms_median"] / paths["state"]["ttft_ms_median"])
        card_targets = [t for t in data["targets"] if t["context"] == ctx["n_tokens"] and t["limit"] == 1.15]
        assert {t["path"]: t["value"] for t in card_targets} == pytest.approx(
            {name: p["ratio_to_state"] for name, p in paths.items() if p["kind"] == "card"}
        )


def test_ttft_paths_agree_on_first_token(ttft_run: tuple[dict[str, Any], Path, Path]) -> None:
    data, _, _ = ttft_run
    for ctx in data["contexts"]:
        paths = ctx["paths"]
        # Re-prefill, llama.cpp's state and a lossless card hold the same f16 K/V.
        assert paths["state"]["first_token"] == paths["reprefill"]["first_token"]
        assert paths["card-b16"]["first_token"] == paths["reprefill"]["first_token"]


def test_ttft_link_model_crossovers(ttft_run: tuple[dict[str, Any], Path, Path]) -> None:
    data, _, _ = ttft_run
    link = data["link"]
    assert link["mbps"] == [1.0, 100.0]
    for ctx, lctx in zip(data["contexts"], link["contexts"], strict=True):
        for name, path in ctx["paths"].items():
            expected = [bench_ttft.handoff_ms(path, mbps) for mbps in link["mbps"]]
            assert lctx["handoff_ms"][name] == pytest.approx(expected)
            export = path["export"]["total_ms_median"] if "export" in path else 0.0
            slow = export + path["bytes"] * 8 / 1e6 * 1e3 + path["ttft_ms_median"]
            assert lctx["handoff_ms"][name][0] == pytest.approx(slow)
        assert lctx["crossovers"]
        for c in lctx["crossovers"]:
            if c["mbps"] is not None:
                a, b = ctx["paths"][c["a"]], ctx["paths"][c["b"]]
                assert bench_ttft.handoff_ms(a, c["mbps"]) == pytest.approx(bench_ttft.handoff_ms(b, c["mbps"]))
                below = c["mbps"] / 2
                winner = c["faster_below"]
                loser = c["b"] if winner == c["a"] else c["a"]
                assert bench_ttft.handoff_ms(ctx["paths"][winner], below) < bench_ttft.handoff_ms(
                    ctx["paths"][loser], below
                )


def test_ttft_memory_probes(ttft_run: tuple[dict[str, Any], Path, Path]) -> None:
    data, _, _ = ttft_run
    for ctx in data["contexts"]:
        memory = ctx["memory"]
        assert memory["kv_f16_bytes"] == ctx["kv_f16_bytes"] > 0
        for key in ("card_export", "card_import", "state_save", "state_load"):
            value = memory[f"{key}_extra_bytes"]
            assert isinstance(value, int) and value >= 0, key


def test_ttft_markdown_and_plots(ttft_run: tuple[dict[str, Any], Path, Path]) -> None:
    data, out, _ = ttft_run
    report = (out / "ttft.md").read_text()
    assert data["command"] in report
    lines = report.splitlines()
    for ctx in data["contexts"]:
        for name in ctx["paths"]:
            # One row in the TTFT table and one in the stage table per context and path.
            rows = [line for line in lines if line.startswith(f"| {ctx['n_tokens']} | {name}")]
            assert len(rows) >= 2, (ctx["n_tokens"], name)
    assert "## Targets" in report
    assert "## Link model" in report
    assert "## Peak extra memory" in report
    pytest.importorskip("matplotlib")
    for suffix in ("latency", "stages", "link"):
        png = out / f"ttft-{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_contexts() -> None:
    assert bench_ttft.parse_contexts("2K, 1K,4096,1k") == [1024, 2048, 4096]
    for bad in ("", "abc", "8", "1M"):
        with pytest.raises(ValueError):
            bench_ttft.parse_contexts(bad)


def test_codec_bench_matches_reference(tmp_path: Path) -> None:
    out = tmp_path / "out"
    arrays = tmp_path / "arrays.npz"
    args = ["bench", "codec", "--mib", "0.03125", "--repeats", "2", "--threads", "2"]
    args += ["--out", str(out), "--save-arrays", str(arrays), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "codec.json").read_text())
    assert set(data["workloads"]) == {"2", "3", "4", "8", "16", "mixed"}
    assert data["checks"] and all(data["checks"].values())
    assert len(data["workloads"]["mixed"]["widths"]) > 1
    for workload in data["workloads"].values():
        assert set(workload["threads"]) == {"1", "2"}
        for r in workload["threads"].values():
            assert r["decode_over_memcpy"] == pytest.approx(r["decode_gbps"] / r["memcpy_gbps"])
            assert r["encode_gbps"] == pytest.approx(data["settings"]["f16_bytes"] / r["encode_seconds"] / 1e9)
    assert len(data["targets"]) == 2 * len(data["workloads"])

    saved = np.load(arrays)
    rows = saved["rows"]
    n, group_size = data["settings"]["row_size"], data["settings"]["group_size"]
    assert rows.shape == (data["settings"]["rows"], n)
    for name in data["workloads"]:
        bits, payload, decoded = saved[f"bits_{name}"], saved[f"payload_{name}"], saved[f"decoded_{name}"]
        assert np.array_equal(payload, ref.encode(rows, bits, group_size)), name
        assert np.array_equal(decoded, ref.decode(payload, bits, n, group_size)), name
        assert payload.nbytes == data["workloads"][name]["payload_bytes"]
    report = (out / "codec.md").read_text()
    for name in data["workloads"]:
        assert f"| {name} |" in report


def test_export_over_prefill_target() -> None:
    from qkvshare_edge import bench_ttft

    card = {"kind": "card", "ratio_to_state": 1.0, "export": {"total_ms_median": 500.0}}
    reprefill = {"kind": "reprefill", "stages_ms_median": {"prefill_context": 4000.0}}
    result = {
        "contexts": [
            {"n_tokens": 8192, "sender_prefill_ms": 3900.0, "paths": {"reprefill": reprefill, "card-default": card}}
        ]
    }
    targets = bench_ttft.evaluate_targets(result)
    over = [t for t in targets if t["limit"] == bench_ttft.TARGET_EXPORT_OVER_PREFILL]
    assert len(over) == 1
    assert over[0]["value"] == pytest.approx(0.125)
    assert over[0]["met"]
