"""The quality harness (`qkvedge eval quality`): metrics, lossless identity, multi-hop chains, outputs.

Runs on the tiny random-weight models with inputs built here: a short text
file and a three-item GSM8K-style JSONL file.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qkvshare_edge import Llama, quality
from qkvshare_edge import quality_metrics as qm
from qkvshare_edge.card import CacheCard
from qkvshare_edge.cli import app
from qkvshare_edge.models import write_tiny_gemma3, write_tiny_llama

# KL of p = (1/2, 1/2) against q = (9/10, 1/10): 1/2 ln(5/9) + 1/2 ln(5) = ln(5/3).
HAND_KL = math.log(5.0 / 3.0)
# Float64 rounding allowed in KL and log-likelihood sums of a few terms.
FLOAT64_TOLERANCE = 1e-12

N_CONTEXT = 48
N_CONTINUATION = 12
GEN_CAP = 8
REPLY_TOKENS = 4
HOPS = (1, 2, 3)
QUANTIZED_BUDGET = 4.0
CONTROLLERS = ("uniform", "key-norm")

TEXT = (
    "The lighthouse keeper climbs the spiral stairs each evening, trims the wick, winds the clockwork "
    "and writes the wind speed in a logbook. In winter the boats stay in the harbor for weeks, and the "
    "keeper repairs nets for the fishermen while the storms pass over the island. "
) * 3

GSM8K_LINES = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?", "answer": "12*2=<<12*2=24>>24\n#### 24"},
    {"question": "Sam had 1,500 coins and spent 250. How many are left?", "answer": "1500-250=1250\n#### 1,250"},
]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("quality-models")
    return {
        "llama": write_tiny_llama(folder / "tiny-llama.gguf", seed=0),
        "gemma3": write_tiny_gemma3(folder / "tiny-gemma3.gguf", seed=0, sliding_window=32),
    }


def make_config(model_path: Path, budgets: tuple[float, ...], **overrides: object) -> quality.QualityConfig:
    options: dict[str, object] = {
        "model_path": str(model_path),
        "controllers": CONTROLLERS,
        "budgets": budgets,
        "hops": HOPS,
        "continuation_tokens": N_CONTINUATION,
        "gen_cap": GEN_CAP,
        "answer_tokens": 0,
        "hop_reply_tokens": REPLY_TOKENS,
        "n_threads": 1,
        "flash_attn": False,
        "model_name": model_path.name,
    }
    options.update(overrides)
    return quality.QualityConfig(**options)  # type: ignore[arg-type]


def text_items(model_path: Path, n_contexts: int, text: str = TEXT, first_context: int = 0) -> list[quality.EvalItem]:
    tokenizer = quality.Tokenizer(str(model_path))
    try:
        return quality.text_items(
            tokenizer,
            text,
            n_context_tokens=N_CONTEXT,
            continuation_tokens=N_CONTINUATION,
            n_contexts=n_contexts,
            seed=0,
            first_context=first_context,
        )
    finally:
        tokenizer.close()


# -- metrics ------------------------------------------------------------------------------


def test_kl_of_identical_logits_is_zero() -> None:
    logits = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
    kl = qm.kl_per_position(qm.reference_log_probs(logits), logits.copy())
    assert np.array_equal(kl, np.zeros(5)), f"KL of identical logits: {kl}"


def test_kl_matches_hand_computed_value() -> None:
    ref = np.log(np.array([[0.5, 0.5]]))
    got = np.log(np.array([[0.9, 0.1]])) + 3.0  # a constant shift leaves the distribution unchanged
    kl = qm.kl_per_position(qm.reference_log_probs(ref), got)
    assert abs(float(kl[0]) - HAND_KL) <= FLOAT64_TOLERANCE, f"KL {kl[0]!r}, expected ln(5/3) = {HAND_KL!r}"


def test_kl_handles_more_rows_than_one_chunk() -> None:
    rng = np.random.default_rng(1)
    ref, got = rng.normal(size=(2, qm.ROW_CHUNK * 2 + 3, 7))
    expected = np.sum(np.exp(qm.log_softmax(ref)) * (qm.log_softmax(ref) - qm.log_softmax(got)), axis=-1)
    diff = float(np.abs(qm.kl_per_position(qm.reference_log_probs(ref), got) - expected).max())
    assert diff <= FLOAT64_TOLERANCE, f"chunked KL differs from the direct sum by {diff}"


def test_top1_agreement() -> None:
    ref_top1 = np.array([0, 1, 2, 3])
    logits = np.eye(4)[[0, 1, 0, 0]]
    assert qm.top1_agreement(ref_top1, logits) == 0.5


def test_sequence_log_likelihood() -> None:
    logits = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
    expected = math.log(0.75) + math.log(0.5)
    got = qm.sequence_log_likelihood(logits, [1, 0])
    assert abs(got - expected) <= FLOAT64_TOLERANCE, f"log-likelihood {got!r}, expected {expected!r}"


@pytest.mark.parametrize(
    ("reference", "got", "expected"),
    [([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 5, 3], 1), ([1, 2, 3], [9], 0), ([1, 2], [1, 2, 3], 2)],
)
def test_leading_agreement(reference: list[int], got: list[int], expected: int) -> None:
    assert qm.leading_agreement(reference, got) == expected


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("So 1,250 remain.\n#### 1,250", "1250"),
        ("The change is -3.\n#### -3", "-3"),
        ("Half of 5 is 2.5\n#### 2.50", "2.5"),
        ("no final line", None),
    ],
)
def test_gsm8k_reference_answer(solution: str, expected: str | None) -> None:
    assert qm.gsm8k_reference_answer(solution) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7 apples, so the answer is $18.00.", "18"),
        ("First 12, then 1,024 and finally 3.5", "3.5"),
        ("He owes -7 dollars", "-7"),
        ("no digits here", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert qm.last_number(text) == expected


def test_strip_calculator_annotations() -> None:
    assert qm.strip_calculator_annotations("16-3-4=<<16-3-4=9>>9 eggs") == "16-3-4=9 eggs"


def test_summarize_skips_failed_cells() -> None:
    base = {"controller": "uniform", "budget": 4.0, "hop": 1}
    rows = [
        {**base, "status": "ok", "kl_mean": 0.1, "top1": 1.0},
        {**base, "status": "ok", "kl_mean": 0.3, "top1": 0.5},
        {**base, "status": "budget_error", "kl_mean": None, "top1": None},
    ]
    (entry,) = qm.summarize(rows)
    assert (entry["n_contexts"], entry["n_skipped"]) == (2, 1)
    assert abs(entry["kl_mean"] - 0.2) <= FLOAT64_TOLERANCE
    assert entry["kl_max"] == 0.3


# -- inputs --------------------------------------------------------------------------------


def test_text_items_have_the_requested_lengths(tiny_models: dict[str, Path]) -> None:
    items = text_items(tiny_models["llama"], n_contexts=3)
    lengths = {(len(i.context), len(i.follow)) for i in items}
    assert lengths == {(N_CONTEXT, N_CONTINUATION)}


def test_text_items_start_with_bos(tiny_models: dict[str, Path]) -> None:
    items = text_items(tiny_models["llama"], n_contexts=3)
    assert {i.context[0] for i in items} == {1}


def test_gsm8k_items(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in GSM8K_LINES), encoding="utf-8")
    tokenizer = quality.Tokenizer(str(tiny_models["llama"]))
    try:
        items = quality.gsm8k_items(tokenizer, quality.read_gsm8k(path, 2))
        prompt = tokenizer(quality.GSM8K_ANSWER_PROMPT)
    finally:
        tokenizer.close()
    assert [i.gold_answer for i in items] == ["7", "24"]
    assert all(i.follow[: i.n_prompt] == prompt for i in items)


def test_first_context_continues_windows(tiny_models: dict[str, Path]) -> None:
    whole = text_items(tiny_models["llama"], n_contexts=3, text=TEXT * 4)
    part = text_items(tiny_models["llama"], n_contexts=2, text=TEXT * 4, first_context=1)
    assert part == whole[1:]


def test_first_context_needs_consecutive_windows(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="--first-context 1 with --n-contexts 40"):
        text_items(tiny_models["llama"], n_contexts=40, first_context=1)


def test_read_gsm8k_skips_the_first_items(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in GSM8K_LINES), encoding="utf-8")
    problems = quality.read_gsm8k(path, 5, first=1)
    assert [q for q, _ in problems] == [line["question"] for line in GSM8K_LINES[1:]]
    tokenizer = quality.Tokenizer(str(tiny_models["llama"]))
    try:
        items = quality.gsm8k_items(tokenizer, problems, first=1)
    finally:
        tokenizer.close()
    assert [i.item_id for i in items] == ["gsm8k-1", "gsm8k-2"]


def test_read_gsm8k_rejects_missing_fields(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        quality.read_gsm8k(path, 5)


# -- the harness on tiny models ------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def harness_run(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> dict[str, object]:
    """Run one text context through budgets 4 and 16 and three hops, keeping every card's tokens."""
    path = tiny_models[request.param]
    config = make_config(path, (QUANTIZED_BUDGET, quality.LOSSLESS_BUDGET))
    items = text_items(path, n_contexts=1)
    tokenizer = quality.Tokenizer(str(path))
    n_instruction = len(tokenizer(quality.HOP_INSTRUCTION))
    tokenizer.close()
    runner = quality.QualityRunner(config, quality.required_n_ctx(config, items, n_instruction))
    cards: dict[tuple[str, float, int], np.ndarray] = {}
    try:
        result = runner.run_item(items[0], cards=cards)
        instruction = runner.instruction
    finally:
        runner.close()
    return {"rows": result.rows, "cards": cards, "item": items[0], "instruction": instruction}


def test_one_row_per_cell(harness_run: dict[str, object]) -> None:
    rows = harness_run["rows"]
    cells = sorted((r["controller"], r["budget"], r["hop"]) for r in rows)  # type: ignore[union-attr]
    expected = sorted((c, b, h) for c in CONTROLLERS for b in (QUANTIZED_BUDGET, 16.0) for h in HOPS)
    assert cells == expected


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_lossless_budget_gives_zero_kl(harness_run: dict[str, object], controller: str) -> None:
    rows = [r for r in harness_run["rows"] if r["budget"] == 16.0 and r["controller"] == controller]  # type: ignore[union-attr]
    assert [r["kl_mean"] for r in rows] == [0.0] * len(HOPS)


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_lossless_budget_gives_full_top1(harness_run: dict[str, object], controller: str) -> None:
    rows = [r for r in harness_run["rows"] if r["budget"] == 16.0 and r["controller"] == controller]  # type: ignore[union-attr]
    assert [r["top1"] for r in rows] == [1.0] * len(HOPS)


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_lossless_budget_gives_full_generation_agreement(harness_run: dict[str, object], controller: str) -> None:
    rows = [r for r in harness_run["rows"] if r["budget"] == 16.0 and r["controller"] == controller]  # type: ignore[union-attr]
    agreement = [(r["gen_agree_tokens"], r["gen_compared_tokens"]) for r in rows]
    assert agreement == [(r["gen_compared_tokens"], r["gen_compared_tokens"]) for r in rows]
    assert all(r["gen_compared_tokens"] > 0 for r in rows)


def test_quantized_budget_changes_the_distributions(harness_run: dict[str, object]) -> None:
    kls = [r["kl_mean"] for r in harness_run["rows"] if r["budget"] == QUANTIZED_BUDGET]  # type: ignore[union-attr]
    assert all(math.isfinite(kl) and kl > 0 for kl in kls), f"KL at budget {QUANTIZED_BUDGET}: {kls}"


def test_cards_stay_within_budget(harness_run: dict[str, object]) -> None:
    bits = [r["bits_per_element"] for r in harness_run["rows"] if r["budget"] == QUANTIZED_BUDGET]  # type: ignore[union-attr]
    assert all(b <= QUANTIZED_BUDGET for b in bits), f"bits per element at budget {QUANTIZED_BUDGET}: {bits}"


def test_chains_append_identical_tokens(harness_run: dict[str, object]) -> None:
    cards: dict[tuple[str, float, int], np.ndarray] = harness_run["cards"]  # type: ignore[assignment]
    mismatched = [
        key
        for key, tokens in cards.items()
        if not np.array_equal(tokens, cards[(quality.LOSSLESS_NAME, quality.LOSSLESS_BUDGET, key[2])])
    ]
    assert mismatched == []


def test_each_hop_appends_instruction_and_reply(harness_run: dict[str, object]) -> None:
    cards: dict[tuple[str, float, int], np.ndarray] = harness_run["cards"]  # type: ignore[assignment]
    item: quality.EvalItem = harness_run["item"]  # type: ignore[assignment]
    instruction: list[int] = harness_run["instruction"]  # type: ignore[assignment]
    chain = [cards[(quality.LOSSLESS_NAME, quality.LOSSLESS_BUDGET, h)].tolist() for h in HOPS]
    step = len(instruction) + REPLY_TOKENS
    assert [len(tokens) for tokens in chain] == [len(item.context) + (h - 1) * step for h in HOPS]
    assert chain[1][: len(item.context) + len(instruction)] == item.context + instruction
    assert chain[2][: len(chain[1])] == chain[1]


def test_rows_report_matching_card_tokens(harness_run: dict[str, object]) -> None:
    assert all(r["card_tokens_match_reference"] is True for r in harness_run["rows"])  # type: ignore[union-attr]


def test_every_row_reports_the_hop_floor(harness_run: dict[str, object]) -> None:
    rows = harness_run["rows"]
    floors = {h: {r["kl_floor"] for r in rows if r["hop"] == h} for h in HOPS}  # type: ignore[union-attr]
    # One floor per hop, shared by every cell of that hop. A nudged card changes the distributions.
    assert all(len(values) == 1 for values in floors.values()), floors
    assert all(math.isfinite(v) and v > 0 for values in floors.values() for v in values), floors


def lossless_card(path: Path) -> CacheCard:
    llm = Llama(str(path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        llm.eval(text_items(path, n_contexts=1)[0].context)
        return llm.export_card(budget=quality.LOSSLESS_BUDGET)
    finally:
        llm.close()


def test_nudged_card_moves_every_element_one_f16_step(tiny_models: dict[str, Path]) -> None:
    card = lossless_card(tiny_models["gemma3"])
    nudged = qm.nudged_card(card, seed=3)
    assert nudged.token_ids is card.token_ids
    assert nudged.n_tokens == card.n_tokens
    for section, moved in zip(card.sections, nudged.sections, strict=True):
        for layer, other in zip(section.layers, moved.layers, strict=True):
            for codes, new in ((layer.k_codes, other.k_codes), (layer.v_codes, other.v_codes)):
                old_halves, new_halves = codes.view(np.uint16), new.view(np.uint16)
                assert np.array_equal(old_halves & 0x8000, new_halves & 0x8000)
                step = (new_halves & 0x7FFF).astype(np.int32) - (old_halves & 0x7FFF).astype(np.int32)
                # A zero magnitude cannot go down: it stays, every other element moves by one.
                zero = (old_halves & 0x7FFF) == 0
                assert np.all(np.abs(step[~zero]) == 1)
                assert np.all(step[zero] >= 0)
                assert np.all(np.isfinite(new_halves.view(np.float16)))


def test_nudged_card_rejects_a_quantized_card(tiny_models: dict[str, Path]) -> None:
    card = lossless_card(tiny_models["gemma3"])
    layer = card.sections[0].layers[0]
    layer.k_bits = np.full_like(layer.k_bits, 8)
    with pytest.raises(ValueError, match="lossless card"):
        qm.nudged_card(card)


def test_budget_below_minimum_is_a_skipped_cell(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama"]
    config = make_config(path, (1.0,), hops=(1,), controllers=("uniform",))
    items = text_items(path, n_contexts=1)
    runner = quality.QualityRunner(config, quality.required_n_ctx(config, items, 8))
    try:
        (row,) = runner.run_item(items[0]).rows
    finally:
        runner.close()
    assert (row["status"], row["kl_mean"]) == ("budget_error", None)


def test_fresh_control(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["gemma3"]
    config = make_config(path, (QUANTIZED_BUDGET, quality.LOSSLESS_BUDGET), hops=(1, 3), fresh_control=True)
    items = text_items(path, n_contexts=1)
    runner = quality.QualityRunner(config, quality.required_n_ctx(config, items, 8))
    try:
        rows = runner.run_item(items[0]).rows
    finally:
        runner.close()
    for row in rows:
        assert row["kl_fresh"] is not None, row
        if row["hop"] == 1:
            # At hop 1 the chain's card is the card made once.
            assert row["kl_fresh"] == row["kl_mean"]
        if row["budget"] == quality.LOSSLESS_BUDGET:
            assert row["kl_fresh"] == 0.0


# -- command line ----------------------------------------------------------------------------


def run_cli(tmp_path: Path, model: Path, source: list[str], out_name: str = "out") -> tuple[object, Path]:
    out = tmp_path / out_name
    args = [
        "eval",
        "quality",
        "--model",
        str(model),
        *source,
        "--controllers",
        ",".join(CONTROLLERS),
        "--budgets",
        "4,16",
        "--hops",
        "1,2",
        "--continuation-tokens",
        str(N_CONTINUATION),
        "--gen-cap",
        str(GEN_CAP),
        "--hop-reply-tokens",
        str(REPLY_TOKENS),
        "--threads",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    return result, out


@pytest.fixture(scope="module")
def cli_text_run(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> tuple[object, Path]:
    tmp_path = tmp_path_factory.mktemp("quality-cli-text")
    text_path = tmp_path / "text.txt"
    text_path.write_text(TEXT, encoding="utf-8")
    source = ["--text", str(text_path), "--context-tokens", str(N_CONTEXT), "--n-contexts", "2"]
    return run_cli(tmp_path, tiny_models["gemma3"], source)


def test_cli_text_run_succeeds(cli_text_run: tuple[object, Path]) -> None:
    result, _ = cli_text_run
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]


def test_cli_prints_the_table(cli_text_run: tuple[object, Path]) -> None:
    result, _ = cli_text_run
    assert "| controller | budget | hop |" in result.output  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "name",
    [
        "quality.json",
        "quality_cells.csv",
        "quality_summary.csv",
        "quality.md",
        "quality_vs_budget.png",
        "quality_vs_hop.png",
    ],
)
def test_cli_writes_outputs(cli_text_run: tuple[object, Path], name: str) -> None:
    _, out = cli_text_run
    assert (out / name).stat().st_size > 0


def test_csv_rows_cover_every_cell(cli_text_run: tuple[object, Path]) -> None:
    _, out = cli_text_run
    with (out / "quality_cells.csv").open(encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    assert header == list(quality.ROW_FIELDS)
    cells = sorted((r["controller"], float(r["budget"]), int(r["hop"]), r["context_id"]) for r in rows)
    contexts = sorted({r["context_id"] for r in rows})
    assert cells == sorted((c, b, h, x) for c in CONTROLLERS for b in (4.0, 16.0) for h in (1, 2) for x in contexts)
    assert len(contexts) == 2


def test_json_cells_have_every_field(cli_text_run: tuple[object, Path]) -> None:
    _, out = cli_text_run
    document = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    cells = document["cells"]
    assert len(cells) == len(CONTROLLERS) * 2 * 2 * 2
    assert all(list(cell) == list(quality.ROW_FIELDS) for cell in cells)


def test_json_records_the_command(cli_text_run: tuple[object, Path]) -> None:
    _, out = cli_text_run
    document = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    assert document["command"].startswith("qkvedge eval quality --model ")


@pytest.fixture(scope="module")
def cli_gsm8k_runs(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> dict[str, Path]:
    """Run the three GSM8K items at once, then as two parts to be merged: item 0, and items 1 and 2."""
    tmp_path = tmp_path_factory.mktemp("quality-cli-gsm8k")
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in GSM8K_LINES), encoding="utf-8")
    source = ["--gsm8k", str(path), "--answer-tokens", "12"]
    runs = {
        "whole": source,
        "part1": [*source, "--n-contexts", "1"],
        "part2": [*source, "--first-context", "1", "--n-contexts", "5"],
    }
    outs = {}
    for name, args in runs.items():
        result, outs[name] = run_cli(tmp_path, tiny_models["llama"], args, out_name=name)
        assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    return outs


@pytest.fixture(scope="module")
def cli_gsm8k_cells(cli_gsm8k_runs: dict[str, Path]) -> list[dict[str, object]]:
    return json.loads((cli_gsm8k_runs["whole"] / "quality.json").read_text(encoding="utf-8"))["cells"]


def test_gsm8k_lossless_loglik_matches(cli_gsm8k_cells: list[dict[str, object]]) -> None:
    lossless = [c for c in cli_gsm8k_cells if c["budget"] == 16.0]
    assert [c["loglik_delta"] for c in lossless] == [0.0] * len(lossless)


def test_gsm8k_gold_answers_in_file_order(cli_gsm8k_cells: list[dict[str, object]]) -> None:
    first = [c for c in cli_gsm8k_cells if (c["controller"], c["budget"], c["hop"]) == ("uniform", 4.0, 1)]
    assert [c["gold_answer"] for c in first] == ["7", "24", "1250"]


def test_gsm8k_cells_score_answers(cli_gsm8k_cells: list[dict[str, object]]) -> None:
    assert all(isinstance(c["correct"], bool) for c in cli_gsm8k_cells)


# Summary fields that measure time, which differs between runs of the same cells.
TIMING_FIELDS = ("export_ms", "measure_ms")


def without_timing(summary: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in entry.items() if k not in TIMING_FIELDS} for entry in summary]


def test_merged_parts_equal_the_whole_run(cli_gsm8k_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    parts = [str(cli_gsm8k_runs["part1"]), str(cli_gsm8k_runs["part2"])]
    result = CliRunner().invoke(app, ["eval", "merge", *parts, "--out", str(out), "--no-plots"])
    assert result.exit_code == 0, result.output
    merged = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    whole = json.loads((cli_gsm8k_runs["whole"] / "quality.json").read_text(encoding="utf-8"))
    assert [i["context_id"] for i in merged["items"]] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert without_timing(merged["summary"]) == without_timing(whole["summary"])
    assert "Joined from 2 runs:" in (out / "quality.md").read_text(encoding="utf-8")


def test_merge_rejects_a_context_in_two_runs(cli_gsm8k_runs: dict[str, Path], tmp_path: Path) -> None:
    parts = [str(cli_gsm8k_runs["whole"]), str(cli_gsm8k_runs["part2"])]
    result = CliRunner().invoke(app, ["eval", "merge", *parts, "--out", str(tmp_path / "merged")])
    assert result.exit_code == 1
    assert "context gsm8k-1 is in run 1 and run 2" in result.output
    assert not (tmp_path / "merged").exists()


def test_merge_rejects_runs_with_other_settings(cli_gsm8k_runs: dict[str, Path], tmp_path: Path) -> None:
    document = json.loads((cli_gsm8k_runs["part2"] / "quality.json").read_text(encoding="utf-8"))
    document["config"]["budgets"] = [3.0]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(document), encoding="utf-8")
    result = CliRunner().invoke(
        app, ["eval", "merge", str(cli_gsm8k_runs["part1"]), str(other), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 1
    assert "run 2 has other settings than run 1 (budgets [4.0, 16.0] against [3.0])" in result.output


def test_merge_rejects_a_part_folder(cli_gsm8k_runs: dict[str, Path]) -> None:
    before = (cli_gsm8k_runs["part1"] / "quality.json").read_bytes()
    parts = [str(cli_gsm8k_runs["part1"]), str(cli_gsm8k_runs["part2"])]
    result = CliRunner().invoke(app, ["eval", "merge", *parts, "--out", str(cli_gsm8k_runs["part1"])])
    assert result.exit_code == 1
    assert "is the folder of run" in result.output
    assert (cli_gsm8k_runs["part1"] / "quality.json").read_bytes() == before


def test_merge_names_a_missing_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert "nowhere not found. Pass the --out folder of an `eval quality` run" in result.output


def test_cli_rejects_an_unknown_controller(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        app, ["eval", "quality", "--model", str(tiny_models["llama"]), "--controllers", "nope", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "unknown controller" in result.output


def test_merge_names_missing_result_fields(tmp_path: Path) -> None:
    partial = tmp_path / "partial.json"
    partial.write_text('{"command": "qkvedge eval quality", "cells": []}', encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", "merge", str(partial), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert "(missing: config, environment, started, wall_s, items)" in result.output
