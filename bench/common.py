"""What the benchmark scripts share: printing and saving a JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], path: str | None, show: bool = True) -> None:
    """Print the report (unless ``show`` is False) and write it to ``path`` when given."""
    text = json.dumps(report, indent=2)
    if show:
        print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
