"""`qkvedge eval quality`: the quality harness (not written yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `eval` command group to the CLI."""
    eval_app = typer.Typer(help="Evaluate card quality against lossless handoff.", no_args_is_help=True)
    app.add_typer(eval_app, name="eval")
