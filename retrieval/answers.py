"""What the service answers about one query: hits, a kNN label, an anomaly score.

Plain dataclasses, so that the CLI prints them, ``--json`` dumps them and the web app shows them
without knowing how they were computed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Hit:
    rank: int
    id: int
    similarity: float
    ref: str
    label: str | None
    folded: list[int] | None = None  # ids of hits that duplicate this one (query --exclude-duplicates)


@dataclass
class Prediction:
    label: str | None
    probabilities: dict[str, float]
    neighbours: int


@dataclass
class AnomalyScore:
    """A query's anomaly score; ``percentile``, ``threshold`` and ``unusual`` are ``None`` where
    the gallery had too few items (under 2) to calibrate them."""

    score: float
    percentile: float | None
    threshold: float | None
    unusual: bool | None
    k: int

    @property
    def verdict(self) -> str:
        return "no verdict" if self.unusual is None else "unusual" if self.unusual else "normal"


@dataclass
class Answer:
    """Everything the service says about one query; ``error`` is set when it could not be read."""

    query: str
    hits: list[Hit] = field(default_factory=list)
    prediction: Prediction | None = None
    anomaly: AnomalyScore | None = None
    error: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.anomaly is not None:
            d["anomaly"]["verdict"] = self.anomaly.verdict
        for hit in d["hits"]:
            if hit["folded"] is None:
                del hit["folded"]
        return {k: v for k, v in d.items() if v is not None}
