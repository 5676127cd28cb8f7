"""End-to-end query latency of the web app through ``gradio_client``, under concurrent clients.

    python bench/app_load.py --index runs/fashion-mnist/index --clients 8 --queries 1000
    python bench/app_load.py --index runs/fashion-mnist/index --clients 32 --queries 5000   # the load test

Starts the app (``retrieval serve``) on a free local port, writes query images (Fashion-MNIST test items as PNG
files), and lets each client thread call the ``/search`` endpoint (upload, search, results)
in a closed loop until the total is reached. Reports p50/p90/p99 latency, errors, and the
server's resident memory after the 1,000th query and at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from harness import closed_loop, latency_percentiles, rss_mb, write_report
from PIL import Image

from retrieval.web.launcher import serve


def query_images(folder: Path, count: int) -> list[Path]:
    from simclr.data import load_images

    data = load_images("fashion-mnist:test")
    paths = []
    for i in range(count):
        p = folder / f"q{i:04d}.png"
        Image.fromarray(data.images[i * 7 % len(data), 0].numpy()).save(p)
        paths.append(p)
    return paths


class RawClient:
    """The /search call over Gradio's HTTP API: upload, join the queue, read the event stream."""

    def __init__(self, url: str):
        import httpx

        self.base = url + "gradio_api"
        self.http = httpx.Client(timeout=60)
        config = self.http.get(url + "config").json()
        self.fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "search")

    def predict(self, file: dict, k: int, api_name: str) -> tuple:
        import uuid

        with open(file["path"], "rb") as f:
            path = self.http.post(self.base + "/upload", files={"files": f}).json()[0]
        session = uuid.uuid4().hex
        self.http.post(self.base + "/queue/join", json={
            "data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, k], "fn_index": self.fn_index,
            "session_hash": session, "event_data": None, "trigger_id": None,
        }).raise_for_status()
        with self.http.stream("GET", self.base + f"/queue/data?session_hash={session}") as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and '"process_completed"' in line:
                    msg = json.loads(line[5:])
                    if not msg.get("success"):
                        raise RuntimeError(str(msg.get("output"))[:200])
                    return tuple(msg["output"]["data"])
        raise RuntimeError("the event stream ended without a result")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--download", action="store_true", help="also download each result image, as a browser does")
    ap.add_argument("--raw", action="store_true",
                    help="clients speak Gradio's HTTP queue protocol with httpx instead of gradio_client "
                         "(whose SSE reader polls every 50 ms and takes most of a 2-core machine's CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from gradio_client import Client, handle_file

    tmp = Path(tempfile.mkdtemp(prefix="app-load-"))
    images = query_images(tmp, 200)
    with serve(args.index, tmp / "server.log", device="auto", timeout=300) as app:
        url = app.url
        warm = Client(url, verbose=False, download_files=False)
        for i in range(args.warmup):
            warm.predict(handle_file(str(images[i % len(images)])), args.k, api_name="/search")

        rss = {}

        def make_client(cid: int):  # noqa: ANN202
            return RawClient(url) if args.raw else Client(
                url, verbose=False, download_files=str(tmp / f"dl{cid}") if args.download else False)

        def call(client, cid: int, n: int) -> None:  # noqa: ANN001
            path = images[(n * 13 + cid) % len(images)]
            gallery, *_ = client.predict(handle_file(str(path)), args.k, api_name="/search")
            if len(gallery) != args.k:
                raise RuntimeError(f"{len(gallery)} results instead of {args.k}")

        def after(n: int) -> None:
            if n == 1000:
                rss["at_1000"] = rss_mb(app.pid)

        latencies, errors, wall = closed_loop(make_client, call, args.clients, args.queries, after)
        rss["at_end"] = rss_mb(app.pid)
    report = {
        "date": time.strftime("%Y-%m-%d"), "index": args.index, "clients": args.clients, "queries": args.queries,
        "k": args.k, "client": "httpx (raw protocol)" if args.raw else "gradio_client", "download_results": args.download, "ok": len(latencies), "errors": len(errors), "first_errors": errors[:5],
        **latency_percentiles(latencies),
        "throughput_qps": round(len(latencies) / wall, 1),
        "server_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "rss_growth_after_1000": round(rss["at_end"] / rss["at_1000"] - 1, 4) if "at_1000" in rss else None,
    }
    write_report(report, args.json)


if __name__ == "__main__":
    main()
