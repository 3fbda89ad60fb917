"""Agent commands of the CLI: chat, serve, pipeline, card export/import (not written yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, card_app: typer.Typer) -> None:
    """Add the agent commands to the CLI and the card export/import commands to `card_app`."""
