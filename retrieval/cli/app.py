"""The Typer application and what every command shares: the error handler and common options."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

app = typer.Typer(
    help="Image retrieval with a self-supervised (SimCLR) encoder: train, index, query, classify, score anomalies, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def handles_errors(fn: Callable) -> Callable:
    """Turn the library's user errors into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from common.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


def echo_lines(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


IndexArg = Annotated[Path, typer.Argument(help="Index folder.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
OptionalPath = Optional[Path]
