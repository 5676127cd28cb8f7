"""Query arguments as the CLI takes them: files, folders (expanded to their images), item ids,
and lines of a list file or stdin. An argument that cannot be expanded becomes an
:class:`Unreadable` entry, answered with its error while the other queries are answered."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from retrieval.errors import RetrievalError
from simclr.data import scan_folder


@dataclass(frozen=True)
class Unreadable:
    """A query argument that names nothing answerable (a folder without images ...)."""

    query: str
    reason: str

    def __str__(self) -> str:
        return self.query


def expand_queries(args: Sequence[str], from_file: str | Path | None = None) -> Iterator[str | Unreadable]:
    """The queries named by ``args`` and by the lines of ``from_file`` (``-``: stdin), lazily.

    Raises:
        RetrievalError: nothing was given, or the list file cannot be opened.
    """
    if not args and from_file is None:
        raise RetrievalError("give at least one image, item id (id:N), folder, or --from-file")
    return _expand(list(args), from_file)


def _expand(args: list[str], from_file: str | Path | None) -> Iterator[str | Unreadable]:
    for q in args:
        p = Path(q)
        if p.is_dir():
            try:
                paths = scan_folder(p).paths
            except UserError as exc:
                yield Unreadable(q, str(exc))
                continue
            yield from (str(f) for f in paths)
        else:
            yield q
    if from_file is not None:
        try:
            handle = sys.stdin if str(from_file) == "-" else open(from_file, encoding="utf-8")
        except OSError as exc:
            raise RetrievalError(f"--from-file {from_file}: {exc.strerror}") from None
        with handle:
            for line in handle:
                if line.strip():
                    yield line.strip()
