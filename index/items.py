"""The items table of an index folder: what each vector stands for."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index.errors import IndexStoreError

ITEMS = "items.jsonl"


@dataclass
class Items:
    """The items table: row ``i`` describes the vector with id ``i``."""

    refs: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.refs)

    def extend(self, other: "Items") -> None:
        self.refs.extend(other.refs)
        self.labels.extend(other.labels)
        self.hashes.extend(other.hashes)

    def select(self, rows: list[int]) -> "Items":
        return Items([self.refs[i] for i in rows], [self.labels[i] for i in rows], [self.hashes[i] for i in rows])

    def write(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for i, (ref, label, digest) in enumerate(zip(self.refs, self.labels, self.hashes)):
                f.write(json.dumps({"id": i, "ref": ref, "label": label, "hash": digest}, ensure_ascii=False) + "\n")

    @classmethod
    def read(cls, path: Path) -> "Items":
        items = cls()
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        row = json.loads(line)
                        if row["id"] != lineno - 1:
                            raise ValueError(f"id {row['id']} out of order")
                        items.refs.append(str(row["ref"]))
                        items.labels.append(row.get("label"))
                        items.hashes.append(str(row.get("hash", "")))
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                        raise IndexStoreError(f"{path} is corrupt at line {lineno} ({exc})") from None
        except FileNotFoundError:
            raise IndexStoreError(f"{path} not found (the index folder is incomplete)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise IndexStoreError(f"{path} cannot be read ({exc})") from None
        return items

    def label_ids(self, classes: list[str]) -> np.ndarray:
        """Labels as int64 positions in ``classes``; -1 where unlabelled."""
        pos = {c: i for i, c in enumerate(classes)}
        return np.array([pos.get(lbl, -1) if lbl is not None else -1 for lbl in self.labels], dtype=np.int64)
