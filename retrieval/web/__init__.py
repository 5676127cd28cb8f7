"""The web server: the JSON API (:mod:`.api`) and the Gradio app (:mod:`.app`, with item
thumbnails in :mod:`.thumbnails` and the drawn embedding map in :mod:`.mapplot`) on one port
(:mod:`.server`), and a launcher that runs it as a server process for benchmarks, screenshots
and tests (:mod:`.launcher`).

The names below are imported on first use, so that ``retrieval serve --api-only`` never loads Gradio.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"WebApp": "app", "build_app": "app", "launch": "app", "no_index_app": "app",
          "parse_auth": "server", "serve": "server"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
