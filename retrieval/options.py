"""The options of the commands that ask and build, as typed dataclasses whose defaults are the
command line's. Free of torch and of the models, so that ``retrieval --help`` starts fast."""

from __future__ import annotations

from dataclasses import dataclass

from index.ann import DEFAULT_MEMORY_BUDGET
from retrieval.anomaly import DEFAULT_K, DEFAULT_PERCENTILE, DEFAULT_SHRINKAGE
from retrieval.errors import RetrievalError
from simclr.knn_defaults import KNN_K, KNN_TEMPERATURE

STRICT_EPOCHS = 3  # the strict anomaly protocol's training budget per class (69 steps for 6,000 images)


@dataclass
class Options:
    """What to answer and with which parameters (the CLI's and the app's defaults are these)."""

    k: int = 10
    classify: bool = False
    knn_k: int = KNN_K
    temperature: float = KNN_TEMPERATURE
    anomaly: bool = False
    anomaly_k: int | None = None  # None: the index's calibrated k
    percentile: float | None = None  # None: the index's calibrated percentile
    nprobe: int | None = None
    ef_search: int | None = None

    def check(self) -> None:
        for name in ("k", "knn_k"):
            if getattr(self, name) < 1:
                raise RetrievalError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.anomaly_k is not None and self.anomaly_k < 1:
            raise RetrievalError(f"anomaly k must be >= 1, got {self.anomaly_k}")
        if self.temperature <= 0:
            raise RetrievalError(f"temperature must be positive, got {self.temperature}")
        for name in ("nprobe", "ef_search"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RetrievalError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass
class IndexConfig:
    """Options of ``retrieval index``."""

    source: str
    out: str
    encoder: str | None = None
    index_type: str = "auto"
    append: bool = False
    batch_size: int = 256
    workers: int | None = None
    device: str = "auto"
    memory_budget_gb: float = DEFAULT_MEMORY_BUDGET / 2**30
    anomaly_k: int = DEFAULT_K
    percentile: float = DEFAULT_PERCENTILE
    anomaly_shrinkage: float = DEFAULT_SHRINKAGE
    progress: bool = True
