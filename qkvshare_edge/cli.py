"""`qkvedge` command line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .card import CacheCard
from .controllers import CONTROLLERS, DEFAULT_CONTROLLER
from .errors import QKVShareError
from .handoff import DEFAULT_BUDGET_BITS
from .models import DEFAULT_MODEL, list_models, resolve_model

app = typer.Typer(
    help="Hand a llama.cpp KV cache from one agent to another as a compact CacheCard.",
    no_args_is_help=True,
    add_completion=False,
)
card_app = typer.Typer(help="Inspect, export and import CacheCard files.", no_args_is_help=True)
app.add_typer(card_app, name="card")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # The gguf package logs every file it writes at INFO.
    logging.getLogger("gguf").setLevel(logging.WARNING)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _check_controller(controller: str) -> str:
    if controller not in CONTROLLERS:
        raise typer.BadParameter(f"unknown controller {controller!r}; choose one of: {', '.join(sorted(CONTROLLERS))}")
    return controller


def _check_budget(budget: float) -> float:
    if not 0 < budget <= 16:
        raise typer.BadParameter(f"budget {budget:g} is out of range; use bits per element in (0, 16]")
    return budget


ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Registry name (see `qkvedge models`) or path to a .gguf file.")
]
ThreadsOption = Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads; default: llama.cpp's choice.")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"qkvedge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """qkvedge: quantized KV-cache handoff between llama.cpp agents."""


@app.command()
def models() -> None:
    """List the models in the registry."""
    for entry in list_models():
        typer.echo(f"{entry.name:16} {entry.description}")


@app.command()
def demo(
    model: ModelOption = DEFAULT_MODEL,
    tokens: Annotated[int, typer.Option(min=16, help="Context length in tokens.")] = 1024,
    budget: Annotated[float, typer.Option(callback=_check_budget, help="Card budget in bits per K/V element.")] = (
        DEFAULT_BUDGET_BITS
    ),
    controller: Annotated[
        str, typer.Option(callback=_check_controller, help="Importance controller for the bit allocation.")
    ] = DEFAULT_CONTROLLER,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens the receiver generates.")] = 24,
    threads: ThreadsOption = None,
    keep: Annotated[Path | None, typer.Option(help="Also copy the card to this path.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each handoff stage.")] = False,
) -> None:
    """Hand a long context from one agent to another process as a CacheCard, and compare with re-prefill."""
    from .demo import DEMO_QUESTION, run_sender

    _setup_logging(verbose)
    try:
        model_path = str(resolve_model(model).resolve())
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        _fail(str(exc))
    n_ctx = tokens + 256
    with tempfile.TemporaryDirectory(prefix="qkvedge-demo-") as tmp:
        card_path = Path(tmp) / "context.qkvc"
        typer.echo(f"agent 1: reading a {tokens}-token context with {model} ...")
        sent = run_sender(
            model_path, card_path, n_tokens=tokens, budget=budget, controller=controller, n_ctx=n_ctx, n_threads=threads
        )
        typer.echo(f"agent 1: exported a card in {sent.export_ms:.0f} ms (prefill took {sent.prefill_ms:.0f} ms)")

        typer.echo("agent 2: importing the card in a separate process ...")
        command = [
            sys.executable,
            "-m",
            "qkvshare_edge.cli",
            "receive",
            str(card_path),
            "--model",
            model_path,
            "--ask",
            DEMO_QUESTION,
            "--max-tokens",
            str(max_tokens),
            "--n-ctx",
            str(n_ctx),
            "--json",
        ]
        if threads is not None:
            command += ["--threads", str(threads)]
        # The temporary folder as working directory: `-m` puts it first on sys.path,
        # and a source checkout there (no compiled extension) would shadow the installed package.
        proc = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp)
        if proc.returncode != 0:
            _fail(f"the receiver process failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if keep is not None:
            keep.write_bytes(card_path.read_bytes())

    agree = 0
    for a, b in zip(got["card_tokens"], got["reprefill_tokens"], strict=False):
        if a != b:
            break
        agree += 1
    n_compared = min(len(got["card_tokens"]), len(got["reprefill_tokens"]))
    speedup = got["reprefill_ttft_ms"] / max(got["card_ttft_ms"], 1e-9)
    typer.echo("")
    typer.echo(f"context length:        {sent.n_tokens} tokens ({model})")
    typer.echo(
        f"card bytes:            {sent.card_bytes:,} ({sent.bits_per_element:.2f} bits/element, budget {budget:g}, "
        f"{controller})"
    )
    typer.echo(
        f"llama.cpp state bytes: {sent.state_bytes:,} (card is {100.0 * sent.card_bytes / sent.state_bytes:.1f}%)"
    )
    typer.echo(
        f"receiver TTFT:         card {got['card_ttft_ms']:.0f} ms (import {got['import_ms']:.0f} ms) vs "
        f"re-prefill {got['reprefill_ttft_ms']:.0f} ms ({speedup:.1f}x faster)"
    )
    typer.echo(f"first tokens agree:    {agree} of {n_compared} greedy tokens match re-prefill")
    typer.echo(f"agent 2 answered:      {got['answer'].strip()!r}")


@app.command()
def receive(
    card: Annotated[Path, typer.Argument(help="Card file to import.")],
    ask: Annotated[str, typer.Option(help="Follow-up text appended after the card's context.")],
    model: ModelOption = DEFAULT_MODEL,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 24,
    n_ctx: Annotated[int, typer.Option(min=16, help="Context size of the receiver.")] = 4096,
    threads: ThreadsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line with timings and token ids.")] = False,
) -> None:
    """Import a card into a fresh context, answer a follow-up, and time it against re-prefill."""
    from .demo import run_receiver, to_json

    _setup_logging(False)
    try:
        result = run_receiver(
            str(resolve_model(model)), card, question=ask, max_tokens=max_tokens, n_ctx=n_ctx, n_threads=threads
        )
    except (QKVShareError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(to_json(result))
    else:
        typer.echo(result.answer)


@card_app.command("inspect")
def card_inspect(path: Annotated[Path, typer.Argument(help="Card file.")]) -> None:
    """Print a card's model, tokens, budget, widths and sizes (checksums are verified on load)."""
    try:
        loaded = CacheCard.load(path)
    except (QKVShareError, FileNotFoundError) as exc:
        _fail(str(exc))
    p = loaded.provenance
    typer.echo(f"file:            {path} ({path.stat().st_size:,} bytes, sha256 {loaded.sha256[:16]}...)")
    typer.echo("checksums:       ok")
    typer.echo(f"model:           {loaded.model.architecture}, id {loaded.model.model_id[:16]}...")
    typer.echo(f"tokens:          {loaded.n_tokens} (positions {loaded.positions[0]}..{loaded.positions[-1]})")
    typer.echo(f"budget:          {p.budget_bits:g} bits requested, {loaded.bits_per_element:.3f} stored")
    typer.echo(f"controller:      {p.controller}, group size {loaded.group_size}")
    typer.echo(f"hop:             {p.hop}, parent {p.parent_sha256[:16] or '-'}")
    typer.echo(f"producer:        {p.producer}")
    for s, section in enumerate(loaded.sections):
        for j, layer in enumerate(section.layers):
            n_bytes = layer.k_codes.nbytes + layer.v_codes.nbytes + layer.k_bits.nbytes + layer.v_bits.nbytes
            typer.echo(f"section {s} layer {j:2d}: {section.n_cells} cells, {n_bytes:,} bytes")
    histogram = ", ".join(f"{bits} bits: {count}" for bits, count in loaded.width_histogram().items())
    typer.echo(f"row widths:      {histogram}")


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the table (JSON).")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Registry name (see `qkvedge models`) or path to a .gguf file.")
    ] = "gemma3-270m",
    text: Annotated[
        Path | None, typer.Option(help="Plain-text file cut into contexts (default: the demo text, repeated).")
    ] = None,
    context_tokens: Annotated[int, typer.Option(min=16, help="Tokens per context, BOS included.")] = 1024,
    n_contexts: Annotated[int, typer.Option(min=1, help="Contexts averaged.")] = 2,
    continuation_tokens: Annotated[int, typer.Option(min=1, help="Teacher-forced positions scored.")] = 64,
    probe_bits: Annotated[int, typer.Option(help="Width of the one quantized part: 2, 3, 4 or 8.")] = 2,
    threads: Annotated[int, typer.Option("--threads", "-t", min=0, help="CPU threads; 0 for every core.")] = 0,
    table_for: Annotated[
        str | None,
        typer.Option(
            "--table-for",
            help=(
                "Write the table for this model (registry name or .gguf path) instead of --model: "
                "the same model with other weight types, such as the Q4_K_M file of an F32 copy."
            ),
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    """Measure how much each cache layer's K and V matter, for the allocator's per-layer weights."""
    from .demo import demo_context
    from .fingerprint import fingerprint_model
    from .llama import Llama
    from .quality import Tokenizer, text_items
    from .sensitivity import measure

    _setup_logging(verbose)
    if probe_bits not in (2, 3, 4, 8):
        _fail(f"--probe-bits {probe_bits} is not a width below 16; use 2, 3, 4 or 8")
    if text is not None and not text.is_file():
        _fail(f"--text {text} is not a file; pass a plain-text file")
    if out.parent and not out.parent.is_dir():
        _fail(f"the folder of --out {out} does not exist; create it first")
    try:
        path = str(resolve_model(model))
        target_path = str(resolve_model(table_for)) if table_for is not None else None
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    target_id = ""
    if target_path is not None:
        measured, target = fingerprint_model(path), fingerprint_model(target_path)
        # Only the weights may differ: a quantized file and its F32 copy share everything else.
        if (measured.architecture, measured.hparams, measured.tokenizer_sha256) != (
            target.architecture,
            target.hparams,
            target.tokenizer_sha256,
        ):
            _fail(
                f"--table-for {table_for} is not the same model as --model {model} with other weights "
                "(architecture, hyperparameters or tokenizer differ); calibrate it directly"
            )
        target_id = target.model_id
    source = text.read_text(encoding="utf-8") if text is not None else demo_context()
    tokenizer = Tokenizer(path)
    try:
        items = text_items(
            tokenizer,
            source,
            n_context_tokens=context_tokens,
            continuation_tokens=continuation_tokens,
            n_contexts=n_contexts,
            seed=0,
            name=text.name if text is not None else "demo_context.txt",
        )
    except ValueError as exc:
        _fail(str(exc))
    finally:
        tokenizer.close()
    n_threads = threads or None
    common: dict[str, object] = {
        "n_ctx": context_tokens + continuation_tokens + 16,
        "flash_attn": False,
        "verbose": False,
        "attention_window": 0,
        "n_threads": n_threads,
        "n_threads_batch": n_threads,
    }
    sender = Llama(path, **common)
    receiver = Llama(path, logits_all=True, **common)
    n_done = [0]

    def progress(message: str) -> None:
        n_done[0] += 1
        logging.getLogger(__name__).info("%d: %s", n_done[0], message)

    table = measure(sender, receiver, [(i.context, i.follow) for i in items], probe_bits=probe_bits, progress=progress)
    if target_path is not None:
        # The table describes the weights, so it serves every file that stores them.
        table.model_id = target_id
        table.notes["measured_on"] = Path(path).name
        path = target_path
    table.notes = {
        **table.notes,
        "model": Path(path).name,
        "source": text.name if text is not None else "demo_context.txt",
        "contexts": n_contexts,
        "context_tokens": context_tokens,
        "continuation_tokens": continuation_tokens,
    }
    table.save(out)
    typer.echo(
        f"wrote {out}: KL at {probe_bits} bits per (section, layer, K/V); "
        f"noise floor {table.notes['noise_floor']:.5f} (entries near it are noise)"
    )
    for s, section in enumerate(table.sections):
        row = "  ".join(f"{j}:K{e['k']:.4f}/V{e['v']:.4f}" for j, e in enumerate(section))
        typer.echo(f"section {s}: {row}")


def _register_command_groups() -> None:
    # Imported here, at the end, so the modules can import helpers from this one.
    from . import agent_cli, bench, quality

    bench.register(app)
    agent_cli.register(app, card_app)
    quality.register(app)


_register_command_groups()

if __name__ == "__main__":
    app()
