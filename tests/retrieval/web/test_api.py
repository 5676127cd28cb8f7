"""The JSON API over real servers: every endpoint with and without credentials, answers equal to
the CLI's, concurrent requests each answered with their own result, and bad requests refused
with the right status while the server keeps serving."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from retrieval.cli import app as cli
from retrieval.web.launcher import serve

USER, PASSWORD, TOKEN = "alice", "correct-horse", "s3cret-token"


@pytest.fixture(scope="module")
def api_index(tiny_index: Path, image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, Path]:
    """A copy of the tiny index whose items table was edited by hand to point one item at a
    file outside the index's folders: the id of that item, and the file."""
    folder = tmp_path_factory.mktemp("api") / "idx"
    shutil.copytree(tiny_index, folder)
    secret = image_folder.parent / "api-secret.png"
    secret.write_bytes(b"\x89PNG TOP-SECRET")
    lines = (folder / "items.jsonl").read_text().splitlines()
    row = json.loads(lines[-1])
    row["ref"] = str(secret)
    lines[-1] = json.dumps(row)
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    return folder, row["id"], secret


@pytest.fixture(scope="module")
def open_api(api_index, tmp_path_factory: pytest.TempPathFactory):
    with serve(api_index[0], tmp_path_factory.mktemp("open") / "server.log", "--api-only", "--max-upload-mb", "0.05") as s:
        with httpx.Client(base_url=s.url + "api/v1/", timeout=60) as client:
            yield client


@pytest.fixture(scope="module")
def secured(api_index, tmp_path_factory: pytest.TempPathFactory):
    with serve(api_index[0], tmp_path_factory.mktemp("secured") / "server.log", "--auth", f"{USER}:{PASSWORD}",
               "--token", TOKEN) as s:
        yield s.url


def _png(image_folder: Path, name: str = "bars/bars_003.png") -> bytes:
    return (image_folder / name).read_bytes()


def _cli_json(index: Path, command: str, image: Path, *args: str) -> dict:
    result = CliRunner().invoke(cli, [command, str(index), str(image), "--json", "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def _same_answer(api: dict, cli_answer: dict) -> None:
    assert [h["id"] for h in api["hits"]] == [h["id"] for h in cli_answer["hits"]]
    for a, b in zip(api["hits"], cli_answer["hits"]):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-5)
        assert (a["ref"], a["label"], a["rank"]) == (b["ref"], b["label"], b["rank"])
    for key in ("prediction", "anomaly"):
        assert (key in api) == (key in cli_answer)
    if "prediction" in api:
        assert api["prediction"]["label"] == cli_answer["prediction"]["label"]
        for c, p in cli_answer["prediction"]["probabilities"].items():
            assert api["prediction"]["probabilities"][c] == pytest.approx(p, abs=1e-5)
    if "anomaly" in api:
        assert api["anomaly"]["score"] == pytest.approx(cli_answer["anomaly"]["score"], rel=1e-5)
        assert api["anomaly"]["verdict"] == cli_answer["anomaly"]["verdict"]


def test_answers_equal_the_cli(open_api: httpx.Client, api_index, image_folder: Path) -> None:
    index = api_index[0]
    image = image_folder / "checks" / "checks_001.png"
    png = image.read_bytes()
    upload = open_api.post("search", params={"k": 5}, files={"image": ("checks_001.png", png, "image/png")})
    assert upload.status_code == 200, upload.text
    _same_answer(upload.json(), _cli_json(index, "query", image, "-k", "5"))
    raw = open_api.post("search", params={"k": 5}, content=png, headers={"content-type": "image/png"})
    _same_answer(raw.json(), upload.json())
    labelled = open_api.post("search", params={"k": 1, "classify": True, "knn_k": 7}, content=png,
                             headers={"content-type": "image/png"}).json()
    _same_answer(labelled, _cli_json(index, "classify", image, "-k", "7"))
    scored = open_api.post("search", params={"k": 1, "anomaly": True}, content=png, headers={"content-type": "image/png"}).json()
    _same_answer(scored, _cli_json(index, "anomaly", image))
    by_id = open_api.post("search", json={"id": 3, "k": 4}).json()
    _same_answer(by_id, _cli_json(index, "query", Path("id:3"), "-k", "4"))
    assert 3 not in [h["id"] for h in by_id["hits"]]  # an indexed item is not its own neighbour
    ref = open_api.get("items/3").json()["ref"]
    assert open_api.post("search", json={"ref": ref, "k": 4}).json()["hits"] == open_api.post("search", json={"id": 3, "k": 4}).json()["hits"]


def test_batch_answers_each_image_in_order(open_api: httpx.Client, image_folder: Path) -> None:
    names = ["bars/bars_003.png", "checks/checks_001.png", "stripes/stripes_002.png"]
    files = [("images", (Path(n).name, _png(image_folder, n), "image/png")) for n in names]
    files.insert(1, ("images", ("notes.txt", b"not an image", "text/plain")))
    r = open_api.post("search/batch", params={"k": 3}, files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [a["query"] for a in results] == ["bars_003.png", "notes.txt", "checks_001.png", "stripes_002.png"]
    assert "not an image" in results[1]["error"] and not results[1]["hits"]
    for name, answer in zip(names, [results[0], *results[2:]]):
        alone = open_api.post("search", params={"k": 3}, content=_png(image_folder, name), headers={"content-type": "image/png"})
        assert [h["id"] for h in answer["hits"]] == [h["id"] for h in alone.json()["hits"]]
    items = open_api.post("search/batch", json={"items": [{"id": 1}, {"id": 2}], "k": 2}).json()["results"]
    assert [a["query"] for a in items] == ["id:1", "id:2"] and all(len(a["hits"]) == 2 for a in items)


def test_concurrent_requests_get_their_own_answers(open_api: httpx.Client, image_folder: Path) -> None:
    images = sorted(image_folder.rglob("*.png"))[:24]
    expected = {}
    for p in images:
        expected[p.name] = [h["id"] for h in open_api.post("search", params={"k": 5}, content=p.read_bytes(),
                                                            headers={"content-type": "image/png"}).json()["hits"]]
    got: dict[str, list[int]] = {}
    errors: list[str] = []
    base = str(open_api.base_url)

    def ask(p: Path) -> None:
        try:
            with httpx.Client(base_url=base, timeout=60) as c:
                for _ in range(3):
                    r = c.post("search", params={"k": 5}, files={"image": (p.name, p.read_bytes(), "image/png")})
                    a = r.json()
                    assert a["query"] == p.name
                    got.setdefault(p.name, [])
                    if got[p.name] and got[p.name] != [h["id"] for h in a["hits"]]:
                        errors.append(p.name)
                    got[p.name] = [h["id"] for h in a["hits"]]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=ask, args=(p,)) for p in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == expected


def test_bad_requests_get_their_status_and_the_server_keeps_serving(open_api: httpx.Client, image_folder: Path) -> None:
    png = _png(image_folder)
    cases = [
        (open_api.post("search", content=b"GIF89a broken", headers={"content-type": "image/gif"}), 400, "image"),
        (open_api.post("search", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n truncated", "image/png")}), 400, "image"),
        (open_api.post("search", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
        (open_api.post("search", content=b"", headers={"content-type": "image/png"}), 400, "empty"),
        (open_api.post("search", json={"id": 10_000}), 404, "not in the index"),
        (open_api.post("search", json={"ref": "/nowhere.png"}), 404, "no indexed item"),
        (open_api.post("search", json={"id": 1, "ref": "x"}), 422, "one of them"),
        (open_api.post("search", params={"k": 0}, content=png, headers={"content-type": "image/png"}), 422, "k"),
        (open_api.post("search", params={"k": "ten"}, content=png, headers={"content-type": "image/png"}), 422, "k"),
        (open_api.post("search", params={"colour": 1}, content=png, headers={"content-type": "image/png"}), 422, "colour"),
        (open_api.post("search", json={"id": 1, "percentile": 140}), 422, "percentile"),
        (open_api.post("search", content=b"x" * 60_000, headers={"content-type": "image/png"}), 413, "limit"),
        (open_api.post("search", files={"image": ("big.png", b"x" * 60_000, "image/png")}), 413, "limit"),
        (open_api.post("search", content=b"abc", headers={"content-type": "text/csv"}), 415, "content type"),
        (open_api.get("items/99999"), 404, "not in the index"),
        (open_api.get("items/-1/image"), 404, "not in the index"),
        (open_api.get("items/abc"), 422, "item_id"),
        (open_api.get("nothing-here"), 404, ""),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (r.request.url, r.status_code, r.text)
        assert words in r.json()["error"], r.text
    ok = open_api.post("search", params={"k": 2}, content=png, headers={"content-type": "image/png"})
    assert ok.status_code == 200 and len(ok.json()["hits"]) == 2


def test_info_items_images_and_duplicates(open_api: httpx.Client, api_index, image_folder: Path) -> None:
    index, edited, secret = api_index
    info = open_api.get("info").json()
    assert info["items"] == 48 and info["dimension"] > 0
    item = open_api.get("items/0").json()
    assert set(item) == {"id", "ref", "label", "hash"} and item["label"]
    image = open_api.get("items/0/image")
    assert image.status_code == 200 and image.content == Path(item["ref"]).read_bytes()
    # An items table edited to point outside the index's folders: refused, nothing leaked.
    r = open_api.get(f"items/{edited}/image")
    assert r.status_code == 403 and b"TOP-SECRET" not in r.content and "outside" in r.json()["error"]
    for path in ("items/0/image/../../../etc/passwd", f"items/{secret}/image", "items/..%2f..%2fetc%2fpasswd/image"):
        r = open_api.get(path)
        assert r.status_code in (404, 422) and b"root:" not in r.content and b"TOP-SECRET" not in r.content, path
    dup = open_api.get("duplicates", params={"threshold": 0.999}).json()
    assert dup["items"] == 48 and dup["threshold"] == 0.999 and isinstance(dup["groups"], list)
    assert dup["pixel_threshold"] is not None and "similarity given" in dup["threshold_source"]
    both = open_api.get("duplicates", params={"threshold": 0.5, "pixel_threshold": 0.999}).json()
    assert (both["threshold"], both["pixel_threshold"], both["threshold_source"]) == (0.5, 0.999, "given")
    assert open_api.get("duplicates", params={"threshold": 3}).status_code == 422
    docs = open_api.get("openapi.json").json()
    assert {"/api/v1/search", "/api/v1/search/batch", "/api/v1/info", "/api/v1/items/{item_id}/image"} <= set(docs["paths"])
    assert open_api.get("docs").status_code == 200


def test_credentials(secured: str, image_folder: Path) -> None:
    png = _png(image_folder)
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    wrong = "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode()
    with httpx.Client(base_url=secured, timeout=60) as c:
        for method, path, kw in [("GET", "api/v1/info", {}), ("GET", "api/v1/items/0", {}), ("GET", "api/v1/items/0/image", {}),
                                 ("GET", "api/v1/duplicates", {"params": {"threshold": 0.99}}),
                                 ("POST", "api/v1/search", {"content": png, "headers": {"content-type": "image/png"}}),
                                 ("POST", "api/v1/search/batch", {"json": {"items": [{"id": 0}]}})]:
            for header in (None, wrong, "Bearer wrong-token", "Basic !!!"):
                headers = {**kw.get("headers", {}), **({"authorization": header} if header else {})}
                r = c.request(method, path, **{**kw, "headers": headers})
                assert r.status_code == 401, (path, header, r.status_code)
                assert "authentication required" in r.json()["error"] and "Basic" in r.headers["www-authenticate"]
            for header in (basic, f"Bearer {TOKEN}"):
                r = c.request(method, path, **{**kw, "headers": {**kw.get("headers", {}), "authorization": header}})
                assert r.status_code == 200, (path, r.status_code, r.text)
        # The app itself stays behind its login.
        assert c.get("config").status_code == 401
        assert c.post("login", data={"username": USER, "password": PASSWORD}).status_code == 200
        assert c.get("config").status_code == 200


def test_a_token_alone_would_leave_the_app_open(tiny_index: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", str(tiny_index), "--token", "t", "--device", "cpu"])
    assert result.exit_code != 0 and "--api-only" in result.output
    result = CliRunner().invoke(cli, ["serve", str(tiny_index), "--api-only", "--share"])
    assert result.exit_code != 0 and "--share" in result.output


def test_a_port_in_use_is_named_before_the_index_loads(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", str(tmp_path / "no-index-here"), "--api-only", "--port", str(port)])
    assert result.exit_code != 0 and f"cannot listen on 127.0.0.1:{port}" in result.output


def test_api_only_without_the_demo_index_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import free_port

    monkeypatch.chdir(tmp_path)  # no runs/ here: nothing to serve, and no page to say so
    result = CliRunner().invoke(cli, ["serve", "--api-only", "--port", str(free_port()), "--device", "cpu"])
    assert result.exit_code == 1 and "runs/fashion-mnist/index" in result.output
    assert "Traceback" not in result.output
