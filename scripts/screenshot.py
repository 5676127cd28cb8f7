"""Take the README's screenshot: serve an index, search with one image in headless Chromium, save a PNG.

    .venv/bin/python scripts/screenshot.py --index runs/fashion-mnist/index --query-item 60123 --out docs/app.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from retrieval.web.launcher import CHROMIUM, CHROMIUM_ARGS, serve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--query-item", type=int, default=0, help="id of the indexed item to search with")
    ap.add_argument("--out", default="docs/app.png")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from retrieval.service import Service
    from retrieval.web import WebApp

    query = Path(tempfile.mkdtemp()) / "query.png"
    web = WebApp(Service.open(args.index, device="cpu"))
    im = web.item_image(args.query_item)
    im.resize((im.width * 4, im.height * 4), 0).save(query)  # nearest-neighbour: large enough to see in the box
    with serve(args.index, query.parent / "server.log", device="auto", timeout=240) as app:
        url = app.url
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#map img").first.wait_for(timeout=60_000)
            before = page.locator("#map img").first.get_attribute("src")
            page.locator("input[type=file]").first.set_input_files(str(query))
            page.locator("#results img").nth(9).wait_for(timeout=60_000)
            # The map follows the results: wait for its new picture, with the query's star.
            page.wait_for_function("b => { const i = document.querySelector('#map img'); return i && i.src !== b && i.complete; }",
                                   arg=before, timeout=30_000)
            page.wait_for_timeout(300)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
