"""Hostile and odd files through the decoder, `retrieval index`, `retrieval query` and the app."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from retrieval.cli import app
from retrieval.service import Service
from retrieval.web import WebApp
from simclr.images import ImageReadError, read_image
from tests.hostile import base_image, build, png_bomb


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    bomb = tmp_path_factory.mktemp("bomb") / "bomb.png"
    png_bomb(bomb)
    folder = tmp_path_factory.mktemp("hostile") / "corpus"
    ok, bad = build(folder, bomb)
    return folder, ok, bad


def test_the_corpus_is_large_enough(corpus) -> None:
    folder, ok, bad = corpus
    assert len(ok) + len(bad) >= 30


def test_every_file_is_read_or_refused_with_its_reason(corpus) -> None:
    folder, ok, bad = corpus
    for name in ok:
        t = read_image(folder / name, 32, 3)
        assert t.shape == (3, 32, 32) and t.dtype == torch.uint8, name
    reasons = {}
    for name in bad:
        with pytest.raises(ImageReadError) as info:
            read_image(folder / name, 32, 3)
        assert name in str(info.value)
        reasons[name] = str(info.value)
    assert "too large (900 Mpx; the limit is" in reasons["bomb.png"]
    assert "not an image" in reasons["text-renamed.jpg"]
    assert "cannot decode" in reasons["truncated.png"] or "truncated" in reasons["truncated.png"]


def test_every_exif_orientation_comes_out_upright(corpus) -> None:
    folder, _, _ = corpus
    upright = read_image(_png(base_image(), folder.parent / "upright.png"), 32, 3).float()
    for o in range(1, 9):
        got = read_image(folder / f"exif-orientation-{o}.jpg", 32, 3).float()
        assert (got - upright).abs().mean() < 6, f"orientation {o}"


def _png(im, path: Path) -> Path:
    im.save(path)
    return path


def test_odd_modes_keep_their_content(corpus) -> None:
    folder, _, _ = corpus
    sixteen = read_image(folder / "sixteen-bit.png", 30, 1)
    assert sixteen.min() < 20 and sixteen.max() > 235  # the 16-bit range is scaled, not clipped
    transparent = read_image(folder / "palette-transparent.png", 16, 3)
    assert transparent.shape == (3, 16, 16)
    tiff_page = read_image(folder / "multipage.tiff", 32, 3)
    assert torch.equal(tiff_page, read_image(_png(base_image(), folder.parent / "page1.png"), 32, 3))


def test_index_accepts_exactly_the_good_files(corpus, tiny_encoder: Path, tmp_path: Path) -> None:
    folder, ok, bad = corpus
    out = tmp_path / "idx"
    result = CliRunner().invoke(app, ["index", "--encoder", str(tiny_encoder), "--source", str(folder), "--out", str(out),
                                      "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"indexed {len(ok)} images" in result.output
    assert f"{len(bad)} unreadable file(s) skipped" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == len(ok)
    refs = [json.loads(line)["ref"] for line in (out / "items.jsonl").read_text().splitlines()]
    assert sorted(Path(r).name for r in refs) == sorted(ok)


def test_query_answers_good_files_and_names_bad_ones(corpus, tiny_index: Path) -> None:
    folder, ok, bad = corpus
    files = [str(folder / n) for n in ok + bad]
    result = CliRunner().invoke(app, ["query", str(tiny_index), *files, "-k", "2", "--json"])
    assert result.exit_code == 1  # some queries failed
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(rows) == len(files)
    by_name = {Path(r["query"]).name: r for r in rows}
    for name in ok:
        assert "error" not in by_name[name] and len(by_name[name]["hits"]) == 2, name
    for name in bad:
        assert name in by_name[name]["error"], name


def test_app_handlers_never_raise(corpus, tiny_index: Path) -> None:
    folder, ok, bad = corpus
    web = WebApp(Service.open(tiny_index, device="cpu"), map_points=10)
    files = [str(folder / n) for n in ok + bad]
    results = web.search(files, [3] * len(files))
    for name, r in zip(ok + bad, results):
        if name in ok:
            assert len(r.gallery) == 3, name
        else:
            assert r.gallery == [] and "⚠️" in r.anomaly and name in r.anomaly, name
