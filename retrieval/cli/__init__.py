"""The ``retrieval`` command line: each command parses its options and calls one library function.

Commands live in modules by group (:mod:`.training`, :mod:`.encoders`, :mod:`.indexing`,
:mod:`.asking`, :mod:`.duplicates`, :mod:`.serving`); importing them registers them on :data:`app`.
"""

from __future__ import annotations

from retrieval.cli import asking, duplicates, encoders, indexing, serving, training  # noqa: F401  (registers the commands)
from retrieval.cli.app import app

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    app(args=argv)


if __name__ == "__main__":
    main()
