"""The latency floor of a Gradio endpoint called through ``gradio_client``: no model, no index.

    python bench/gradio_floor.py --clients 1 8 --queries 500

Serves a minimal Gradio app with the same call shape as the retrieval app's ``/search``
(an uploaded image file and a number in, a short text out, queued like every Gradio event)
whose function does nothing but read the image's size, and measures it the way
``bench/app_load.py`` measures the real app: client threads in a closed loop, p50/p90/p99.
Whatever this endpoint takes is the least any Gradio app takes through ``gradio_client``
on the same machine.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from harness import latency_percentiles, run_threads, write_report
from PIL import Image

from retrieval.web.launcher import free_port, run_server


def serve(port: int) -> None:
    import gradio as gr

    def echo(path: str, k: float) -> str:
        with Image.open(path) as im:
            return f"{im.size} {int(k)}"

    with gr.Blocks() as demo:
        image = gr.Image(type="filepath")
        k = gr.Number(10)
        out = gr.Textbox()
        gr.Button().click(echo, inputs=[image, k], outputs=out, api_name="echo")
    demo.queue(default_concurrency_limit=None).launch(server_name="127.0.0.1", server_port=port, show_error=False)


def measure(url: str, images: list[str], clients: int, queries: int, warmup: int = 20) -> dict:
    from gradio_client import Client, handle_file

    warm = Client(url, verbose=False, download_files=False)
    for i in range(warmup):
        warm.predict(handle_file(images[i % len(images)]), 10, api_name="/echo")
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    done = [0]

    def loop(_: int) -> None:
        client = Client(url, verbose=False, download_files=False)
        while True:
            with lock:
                if done[0] >= queries:
                    return
                done[0] += 1
                image = images[done[0] % len(images)]
            start = time.perf_counter()
            try:
                client.predict(handle_file(image), 10, api_name="/echo")
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    wall = run_threads(loop, clients)
    return {
        "clients": clients, "queries": queries, "ok": len(latencies), "errors": len(errors), "first_errors": errors[:3],
        **latency_percentiles(latencies),
        "min_ms": round(1000 * min(latencies), 1) if latencies else None, "throughput_qps": round(len(latencies) / wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return

    import gradio
    import gradio_client

    tmp = Path(tempfile.mkdtemp(prefix="gradio-floor-"))
    # Distinct files: Gradio caches uploads by content, and concurrent uploads of one file race
    # on the same cache path.
    rng = np.random.default_rng(0)
    images = []
    for i in range(200):
        images.append(str(tmp / f"q{i:03d}.png"))
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(images[-1])
    port = free_port()
    with run_server([str(Path(__file__).resolve()), "--serve", str(port)], port, tmp / "server.log") as app:
        rows = [measure(app.url, images, c, args.queries) for c in args.clients]
    report = {"date": time.strftime("%Y-%m-%d"), "gradio": gradio.__version__, "gradio_client": gradio_client.__version__,
              "endpoint": "image file + number in, text out; the function only opens the image", "rows": rows}
    write_report(report, args.json)


if __name__ == "__main__":
    main()
