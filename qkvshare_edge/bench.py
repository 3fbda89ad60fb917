"""`qkvedge bench`: latency and codec throughput benchmarks (not written yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `bench` command group to the CLI."""
    bench_app = typer.Typer(help="Benchmarks: receiver TTFT and codec throughput.", no_args_is_help=True)
    app.add_typer(bench_app, name="bench")
