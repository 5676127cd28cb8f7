"""The app in a real browser: headless Chromium (Debian's) driven by Playwright."""

from pathlib import Path

import pytest

from retrieval.web.launcher import CHROMIUM, CHROMIUM_ARGS, serve

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/setup.sh --test installs it)"),
]


@pytest.fixture(scope="module")
def server(tiny_index: Path, tmp_path_factory: pytest.TempPathFactory):
    with serve(tiny_index, tmp_path_factory.mktemp("server") / "app.log") as app:
        yield app.url


def test_upload_search_shows_results_and_label(server: str, image_folder: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        # Nothing leaves this machine: requests for other hosts (web fonts) fail at once.
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server) else route.abort())
        page.goto(server, wait_until="domcontentloaded")
        page.locator("input[type=file]").first.wait_for(state="attached", timeout=60_000)
        page.locator("input[type=file]").first.set_input_files(str(image_folder / "stripes" / "stripes_004.png"))
        results = page.locator("#results img")
        results.nth(9).wait_for(timeout=60_000)
        assert results.count() == 10
        page.wait_for_function("document.querySelector('#knn-label') && /(bars|checks|stripes)/.test(document.querySelector('#knn-label').innerText)", timeout=30_000)
        assert "Anomaly" in page.locator("#anomaly").inner_text()
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        browser.close()
