"""The options of the commands that ask and build, as typed dataclasses whose defaults are the
command line's. Free of torch and of the models, so that ``retrieval --help`` starts fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from index.ann import DEFAULT_MEMORY_BUDGET
from retrieval.anomaly import DEFAULT_K, DEFAULT_PERCENTILE, DEFAULT_SHRINKAGE, DEFAULT_SPACE_MODE
from retrieval.duplicates import DEFAULT_K as DUPLICATE_K
from retrieval.errors import RetrievalError
from simclr.knn_defaults import KNN_K, KNN_TEMPERATURE

DEFAULT_INDEX = Path("runs/fashion-mnist/index")  # where the README's demo writes its index


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
    exclude_duplicates: bool = False  # fold hits that duplicate a better hit into it
    duplicate_threshold: float | None = None  # None: the index's calibrated threshold

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
        if self.duplicate_threshold is not None and not -1.0 <= self.duplicate_threshold <= 1.0:
            raise RetrievalError(f"duplicate threshold must be a cosine similarity in [-1, 1], got {self.duplicate_threshold}")


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
    anomaly_space: str = DEFAULT_SPACE_MODE  # retrieval.anomaly.SPACE_MODES
    progress: bool = True


@dataclass
class DuplicateConfig:
    """Options of ``retrieval duplicates`` (its defaults are these)."""

    threshold: float | None = None  # None: the index's calibrated threshold
    pixel_threshold: float | None = None  # None: the index's calibrated one (where it has thumbnails)
    pixels: bool = True  # check proposed pairs' aligned pixels (where the index has thumbnails)
    k: int = DUPLICATE_K
    nprobe: int | None = None  # None: duplicates.SCAN_NPROBE
    device: str = "auto"  # for a calibration on demand

    def check(self) -> None:
        if self.k < 1:
            raise RetrievalError(f"k must be >= 1, got {self.k}")
        if self.nprobe is not None and self.nprobe < 1:
            raise RetrievalError(f"nprobe must be >= 1, got {self.nprobe}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise RetrievalError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold}")
        if self.pixel_threshold is not None and not -1.0 <= self.pixel_threshold <= 1.0:
            raise RetrievalError(f"pixel threshold must be a correlation in [-1, 1], got {self.pixel_threshold}")
