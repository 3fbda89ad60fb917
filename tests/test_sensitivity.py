"""Per-layer sensitivity tables, the calibrate command, and the allocator's measured distortion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qkvshare_edge import quality
from qkvshare_edge.allocation import RowGroup, allocate, payload_bytes
from qkvshare_edge.cli import app
from qkvshare_edge.fingerprint import fingerprint_model
from qkvshare_edge.models.dequantize import write_f32_copy
from qkvshare_edge.sensitivity import SENSITIVITY_FLOOR, LayerSensitivity, bundled, measure


def small_table(model_id: str = "m" * 64) -> LayerSensitivity:
    return LayerSensitivity(
        model_id,
        2,
        [[{"k": 0.4, "v": 0.1, "n_rows": 100.0}], [{"k": 0.0, "v": 0.2, "n_rows": 50.0}]],
    )


def test_table_round_trip_and_weights(tmp_path: Path) -> None:
    table = small_table()
    loaded = LayerSensitivity.load(table.save(tmp_path / "t.json"))
    assert loaded == table
    weights = loaded.row_weights()
    mean = np.mean([0.4 / 100, 0.1 / 100, 0.0, 0.2 / 50])
    assert weights[0][0] == (pytest.approx(0.004), pytest.approx(0.001))
    # A layer measured at 0 keeps a floor.
    assert weights[1][0] == (pytest.approx(SENSITIVITY_FLOOR * mean), pytest.approx(0.004))
    assert loaded.matches([1, 1])
    assert not loaded.matches([2])


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda d: d.update(version=9), "version 9"),
        (lambda d: d.pop("sections"), "sections"),
        (lambda d: d["sections"][0][0].update(k=-1.0), "negative"),
        (lambda d: d.update(sections=[]), "no layers"),
    ],
)
def test_invalid_table_raises(tmp_path: Path, edit, phrase: str) -> None:
    data = json.loads(small_table().to_json())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{path} is not a valid sensitivity table.*{phrase}"):
        LayerSensitivity.load(path)


# Rounding of a KL printed with 5 decimals.
PRINTED = 0.5e-5


def test_bundled_table_for_the_default_model() -> None:
    from qkvshare_edge.fingerprint import fingerprint_model
    from qkvshare_edge.models import resolve_model

    model_id = fingerprint_model(resolve_model("gemma3-270m")).model_id
    table = bundled(model_id)
    assert table is not None and table.matches([3, 15])
    assert bundled("0" * 64) is None


def test_measure_and_export_with_table(new_llama, gemma3_path, text_tokens) -> None:
    sender = new_llama(gemma3_path, flash_attn=False)
    receiver = new_llama(gemma3_path, flash_attn=False, logits_all=True)
    messages: list[str] = []
    table = measure(sender, receiver, [(text_tokens[:60], text_tokens[60:68])], progress=messages.append)
    assert table.model_id == sender.fingerprint.model_id
    assert [len(s) for s in table.sections] == [1, 5]
    assert all(e["k"] >= 0 and e["v"] >= 0 for s in table.sections for e in s)
    assert sum(e["k"] + e["v"] for s in table.sections for e in s) > 0
    # The noise floor goes to the notes, and each entry is the probe's KL (both printed with 5 decimals).
    floor = float(messages[0].rsplit(" ", 1)[1])
    assert messages[0].startswith("noise floor")
    assert floor == pytest.approx(table.notes["noise_floor"], abs=PRINTED)
    assert table.notes["noise_floor"] >= 0
    first = float(messages[1].rsplit(" ", 1)[1])
    assert messages[1].startswith("section 0 layer 0 K")
    assert table.sections[0][0]["k"] == pytest.approx(first, abs=PRINTED)

    sender.clear_cache()
    sender.eval(text_tokens[:100])
    with_table = sender.export_card(budget=3.0, controller="uniform", sensitivity=table)
    flat = sender.export_card(budget=3.0, controller="uniform", sensitivity=None)
    assert with_table.bits_per_element <= 3.0
    assert flat.bits_per_element <= 3.0
    # The table moves bits between layers; without it every layer's K gets the same widths.
    k_means = [float(layer.k_bits.mean()) for s in with_table.sections for layer in s.layers]
    assert max(k_means) > min(k_means)

    wrong = small_table(sender.fingerprint.model_id)
    with pytest.raises(ValueError, match="does not fit this model"):
        sender.export_card(budget=3.0, sensitivity=wrong)


def test_calibrate_command(tmp_path: Path, gemma3_path: Path) -> None:
    out = tmp_path / "table.json"
    args = ["calibrate", "--model", str(gemma3_path), "--context-tokens", "48", "--continuation-tokens", "8"]
    result = CliRunner().invoke(app, [*args, "--n-contexts", "1", "--out", str(out), "-t", "2"])
    assert result.exit_code == 0, result.output
    table = LayerSensitivity.load(out)
    assert table.notes["context_tokens"] == 48
    assert "section 1:" in result.output

    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x.json"), "--probe-bits", "5"])
    assert result.exit_code == 1
    assert "--probe-bits 5" in result.output
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "missing" / "x.json")])
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_calibrate_table_for_a_copy(tmp_path: Path, gemma3_path: Path, llama_path: Path) -> None:
    f32_copy = write_f32_copy(gemma3_path, tmp_path / "tiny-gemma3-f32.gguf")
    out = tmp_path / "table.json"
    args = ["calibrate", "--model", str(f32_copy), "--context-tokens", "48", "--continuation-tokens", "8"]
    result = CliRunner().invoke(app, [*args, "--n-contexts", "1", "--table-for", str(gemma3_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = LayerSensitivity.load(out)
    # Measured on the copy, written for the original: its exports use the table.
    assert table.model_id == fingerprint_model(gemma3_path).model_id
    assert table.model_id != fingerprint_model(f32_copy).model_id
    assert table.notes["measured_on"] == f32_copy.name
    assert table.notes["model"] == gemma3_path.name

    other = CliRunner().invoke(app, [*args, "--table-for", str(llama_path), "--out", str(tmp_path / "x.json")])
    assert other.exit_code == 1
    assert "is not the same model" in other.output
    assert not (tmp_path / "x.json").exists()


def test_flat_controller_entries() -> None:
    known = ["uniform", "attention"]
    assert quality.parse_controllers("all", known) == ("uniform:flat", "uniform", "attention")
    assert quality.parse_controllers("attention:flat,uniform", known) == ("attention:flat", "uniform")
    assert quality.export_options("uniform:flat") == ("uniform", {"sensitivity": None, "k_weight": 1.0})
    assert quality.export_options("attention") == ("attention", {})
    with pytest.raises(ValueError, match="unknown controller"):
        quality.parse_controllers("nope:flat", known)


@pytest.mark.parametrize("budget", [3.2, 3.6, 4.5, 6.0])
def test_measured_distortion_stays_within_budget(budget: float) -> None:
    # Measured distortions need not be convex in the width; the allocator must still
    # take a row's steps in order and stay within the budget.
    rng = np.random.default_rng(int(budget * 10))
    groups = []
    for n in (64, 128):
        rows = 40
        measured = {w: rng.uniform(0, 1, rows) / (2**w) for w in (2, 3, 4, 8)}
        measured[3] = measured[2] * rng.uniform(0.5, 1.5, rows)  # sometimes worse than 2 bits
        groups.append(RowGroup(n, rng.uniform(0.1, 2, rows), measured=measured))
    widths = allocate(groups, budget, 32)
    n_elements = sum(g.n * g.scores.shape[0] for g in groups)
    assert payload_bytes(groups, widths, 32) <= budget * n_elements / 8


def test_export_with_measured_distortion(new_llama, gemma3_path, text_tokens) -> None:
    sender = new_llama(gemma3_path)
    sender.eval(text_tokens[:100])
    card = sender.export_card(budget=3.5, distortion="measured")
    assert card.bits_per_element <= 3.5
    assert "measure" in sender.last_export_timing.stages_ms
    with pytest.raises(ValueError, match="distortion must be 'model' or 'measured'"):
        sender.export_card(budget=3.5, distortion="exact")
