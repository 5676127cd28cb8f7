"""Latency and throughput of the JSON search API under sequential and concurrent clients.

    python bench/api_load.py --index bench/out/api/idx --json bench/out/api/api_load.json

Starts ``retrieval serve INDEX`` (the app and the API, as a user runs it) on a free local port,
with dynamic batching (the default), then the same with ``--api-only``, then with
``--max-batch 1`` (every request its own pass), and measures, each time:

- ``sequential``: one client, one request after another;
- ``concurrent``: ``--clients`` clients (threads with a keep-alive connection each) in a closed
  loop;
- ``soak`` (batching only): ``--soak-clients`` clients sharing ``--soak-requests`` requests, with
  the server's resident memory read after the 1,000th request and after the last.

Every request is ``POST /api/v1/search?k=10&classify=true&anomaly=true`` with a PNG of a
Fashion-MNIST test image as the raw body (200 different images, in turn); an answer counts as
an error unless it is 200 with k hits, a label and an anomaly verdict.

The clients are Python threads (``http.client``), whose own work shares the machine's cores with
the server. With ``--wrk`` (Debian's ``wrk``, a load generator in C) the concurrent phase is
measured again with it, for the server's capacity with less of the machine spent on the
clients (wrk counts non-2xx answers but does not check their bodies).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from harness import closed_loop, latency_percentiles, machine, rss_mb, write_report
from PIL import Image

from retrieval.web.launcher import serve

PATH = "/api/v1/search?k={k}&classify=true&anomaly=true"


def query_pngs(count: int) -> list[bytes]:
    from simclr.data import load_images

    data = load_images("fashion-mnist:test")
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(data.images[i * 7 % len(data), 0].numpy()).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


class Client:
    """One keep-alive HTTP/1.1 connection (the standard library's: the cheapest client in Python)."""

    def __init__(self, port: int, k: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.path = PATH.format(k=k)
        self.k = k

    def search(self, png: bytes) -> None:
        try:
            self.conn.request("POST", self.path, body=png, headers={"Content-Type": "image/png"})
            r = self.conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # the next request opens a new connection
            raise
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
        a = json.loads(body)
        if len(a["hits"]) != self.k or not a["prediction"]["label"] or a["anomaly"]["verdict"] not in ("normal", "unusual"):
            raise RuntimeError(f"incomplete answer: {str(a)[:200]}")


def run(port: int, pid: int, pngs: list[bytes], clients: int, requests: int, k: int,
        rss_at: int | None = None) -> dict:
    rss: dict[str, float] = {}

    def after(n: int) -> None:
        if rss_at is not None and n == rss_at:
            rss["at_1000"] = rss_mb(pid)

    latencies, errors, wall = closed_loop(lambda cid: Client(port, k),
                                          lambda client, cid, n: client.search(pngs[(n * 13 + cid) % len(pngs)]),
                                          clients, requests, after)
    out = {"clients": clients, "requests": requests, "ok": len(latencies), "errors": len(errors),
           "first_errors": errors[:5], **latency_percentiles(latencies),
           "searches_per_s": round(len(latencies) / wall, 1), "wall_s": round(wall, 1)}
    if rss_at is not None:
        rss["at_end"] = rss_mb(pid)
        out["server_rss_mb"] = {key: round(v, 1) for key, v in rss.items()}
        out["rss_growth_after_1000"] = round(rss["at_end"] / rss["at_1000"] - 1, 4) if "at_1000" in rss else None
    return out


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/png"
local bodies = {}
for i = 0, COUNT - 1 do
  local f = io.open(string.format("DIR/q%04d.png", i), "rb")
  bodies[i + 1] = f:read("*a")
  f:close()
end
local n = 0
request = function()
  n = n % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[n])
end
"""


def run_wrk(port: int, pngs: list[bytes], clients: int, seconds: int, k: int, folder: Path) -> dict:
    """The concurrent phase with wrk: ``clients`` connections on 2 threads for ``seconds``."""
    for i, png in enumerate(pngs):
        (folder / f"q{i:04d}.png").write_bytes(png)
    script = folder / "post.lua"
    script.write_text(WRK_SCRIPT.replace("COUNT", str(len(pngs))).replace("DIR", str(folder)))
    out = subprocess.run(["wrk", "-t2", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}" + PATH.format(k=k)], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return round(value / 1000 if unit == "us" else value * 1000 if unit == "s" else value, 1)

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"client": "wrk", "clients": clients, "seconds": seconds, "requests": requests,
            "non_2xx": int(bad.group(1)) if bad else 0, "socket_errors": errors.group(1) if errors else None,
            "p50_ms": ms("50%"), "p90_ms": ms("90%"), "p99_ms": ms("99%"),
            "searches_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}


def passes(port: int) -> tuple[int, int]:
    """The server's searches and passes so far (GET /api/v1/info)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/v1/info")
    server = json.loads(conn.getresponse().read())["server"]
    return server["searches"], server["passes"]


def with_batches(port: int, measure) -> dict:  # noqa: ANN001
    before = passes(port)
    out = measure()
    after = passes(port)
    searches, made = after[0] - before[0], after[1] - before[1]
    out["mean_batch"] = round(searches / made, 2) if made else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--sequential", type=int, default=1000, help="requests of the one sequential client")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3000, help="requests the concurrent clients share")
    ap.add_argument("--soak-clients", type=int, default=32)
    ap.add_argument("--soak-requests", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--skip-unbatched", action="store_true")
    ap.add_argument("--wrk", type=int, default=0, metavar="SECONDS", help="also measure the concurrent phase with wrk for this long")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    pngs = query_pngs(200)
    tmp = Path(tempfile.mkdtemp(prefix="api-load-"))
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                    "index": args.index, "k": args.k, "request": "POST " + PATH.format(k=args.k) + ", a PNG as the raw body"}
    settings = [("batched", []), ("batched, --api-only", ["--api-only"])]
    settings += [] if args.skip_unbatched else [("unbatched", ["--max-batch", "1"])]
    for name, extra in settings:
        with serve(args.index, tmp / f"server-{name}.log", *extra, device="cpu", timeout=300) as app:
            port = int(app.url.rsplit(":", 1)[1].strip("/"))
            run(port, app.pid, pngs, 4, args.warmup, args.k)  # warm-up: first calls build the anomaly table
            part = {"rss_after_warmup_mb": round(rss_mb(app.pid), 1)}
            part["sequential"] = with_batches(port, lambda: run(port, app.pid, pngs, 1, args.sequential, args.k))
            part["concurrent"] = with_batches(port, lambda: run(port, app.pid, pngs, args.clients, args.requests, args.k))
            if args.wrk and shutil.which("wrk"):
                part["concurrent_wrk"] = with_batches(port, lambda: run_wrk(port, pngs, args.clients, args.wrk, args.k, tmp))
            if name == "batched" and args.soak_requests:  # the app and the API, as a user runs them
                part["soak"] = with_batches(port, lambda: run(port, app.pid, pngs, args.soak_clients, args.soak_requests,
                                                              args.k, rss_at=1000))
            report[name] = part
            print(json.dumps({name: part}), flush=True)
    write_report(report, args.json)


if __name__ == "__main__":
    main()
