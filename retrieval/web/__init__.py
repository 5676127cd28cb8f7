"""The web app: Gradio handlers and layout (:mod:`.app`), item thumbnails (:mod:`.thumbnails`),
the drawn embedding map (:mod:`.mapplot`), and a launcher that runs it as a server process for
benchmarks, screenshots and tests (:mod:`.launcher`)."""

from retrieval.web.app import WebApp, build_app, launch, no_index_app, parse_auth

__all__ = ["WebApp", "build_app", "launch", "no_index_app", "parse_auth"]
