import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from retrieval.cli import app
from retrieval.errors import RetrievalError

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_index_skips_and_counts_unreadable_files(tiny_encoder: Path, image_folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(image_folder, src)
    (src / "bars" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (src / "bars" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "idx"
    r = run("index", "--encoder", tiny_encoder, "--source", src, "--out", out, "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "indexed 48 images" in r.output and "2 unreadable file(s) skipped" in r.output
    assert "broken.png" in r.output and "empty.jpg" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 48 and manifest["classes"] == ["bars", "checks", "stripes"]


def test_append_skips_already_indexed_content(tiny_encoder: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    assert run("index", "--encoder", tiny_encoder, "--source", image_folder / "bars", "--out", out, "--workers", 0, "--no-progress").exit_code == 0
    r = run("index", "--append", "--source", image_folder, "--out", out, "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "indexed 32 images" in r.output and "16 already indexed" in r.output and "48 in all" in r.output
    # Checks and stripes joining an index of bars: unlike what its anomaly space was fit on.
    assert "of the appended images score as unusual against the index's gallery" in r.output
    r = run("index", "--append", "--source", image_folder, "--out", out, "--workers", 0, "--no-progress")
    assert "indexed 0 images" in r.output and "48 already indexed" in r.output


def test_query_text_and_json(tiny_index: Path, image_folder: Path) -> None:
    img = image_folder / "checks" / "checks_001.png"
    r = run("query", tiny_index, img, "-k", 3)
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0] == str(img) and len(lines) == 4 and lines[1].split()[0] == "1"
    r = run("query", tiny_index, img, "id:2", "-k", 2, "--json")
    rows = [json.loads(line) for line in r.output.strip().splitlines()]
    assert [len(row["hits"]) for row in rows] == [2, 2]
    assert rows[0]["hits"][0]["ref"] == str(img.resolve())
    assert {"rank", "similarity", "ref", "label", "id"} <= set(rows[0]["hits"][0])


def test_query_with_a_bad_image_answers_the_rest(tiny_index: Path, image_folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("hello")
    r = run("query", tiny_index, bad, image_folder / "bars" / "bars_000.png", "-k", 1)
    assert r.exit_code == 1
    assert "error: " in r.output and "notes.jpg: not an image" in r.output
    assert "bars_000.png" in r.output


def test_classify_and_anomaly(tiny_index: Path, image_folder: Path) -> None:
    r = run("classify", tiny_index, image_folder / "stripes", "-k", 5, "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.strip().splitlines()]
    assert len(rows) == 16
    assert all(abs(sum(row["prediction"]["probabilities"].values()) - 1) < 1e-4 for row in rows)
    r = run("anomaly", tiny_index, "id:0", "id:1")
    assert r.exit_code == 0, r.output
    assert "percentile" in r.output and ("normal" in r.output or "UNUSUAL" in r.output)


def test_an_index_of_one_image_scores_without_a_verdict_and_says_why(tiny_encoder: Path, image_folder: Path,
                                                                     tmp_path: Path) -> None:
    # One item has no neighbour to be scored against: no percentile, no threshold, no verdict
    # (not "normal" at an infinite threshold), and the JSON stays JSON (no NaN or Infinity).
    (tmp_path / "one").mkdir()
    shutil.copy(image_folder / "bars" / "bars_000.png", tmp_path / "one")
    out = tmp_path / "idx"
    r = run("index", "--encoder", tiny_encoder, "--source", tmp_path / "one", "--out", out, "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["calibration"]["threshold"] is None
    told = "the index has 1 item(s), too few to calibrate a verdict"
    r = run("info", out)
    assert r.exit_code == 0 and f"k=5, no threshold: {told}" in r.output, r.output
    query = image_folder / "checks" / "checks_000.png"
    r = run("anomaly", out, query)
    assert r.exit_code == 0 and "no verdict" in r.output and told in r.output and "normal" not in r.output, r.output
    r = run("anomaly", out, query, "--json")
    answer = json.loads(r.output, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert answer["anomaly"]["verdict"] == "no verdict" and answer["anomaly"]["unusual"] is None
    assert answer["anomaly"]["percentile"] is None and answer["anomaly"]["threshold"] is None
    assert answer["anomaly"]["score"] > 0 and told in answer["note"]


def test_a_training_run_stopped_by_ctrl_c_says_how_to_go_on(image_folder: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import simclr.train

    out = tmp_path / "run"

    def stopped_after_a_save(cfg, **kwargs):  # noqa: ANN001, ANN003
        out.mkdir()
        (out / simclr.train.CHECKPOINT).write_bytes(b"saved")
        raise KeyboardInterrupt

    monkeypatch.setattr(simclr.train, "train", stopped_after_a_save)
    r = run("train", "--data", image_folder, "--out", out, "--epochs", 1)
    assert r.exit_code == 130 and "interrupted" in r.output, r.output
    assert f"`retrieval train --out {out} --resume` goes on from its last save" in r.output
    assert "its whitening fit on the images as training held them" in r.output  # (a folder)
    monkeypatch.setattr(simclr.train, "train", lambda cfg, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    r = run("train", "--data", image_folder, "--out", tmp_path / "none", "--epochs", 1)
    assert r.exit_code == 130 and "--resume" not in r.output, r.output  # (nothing saved: nothing to go on from)


def test_missing_index_is_one_line(tmp_path: Path) -> None:
    r = run("query", tmp_path / "nope", "x.png")
    assert r.exit_code == 1
    assert r.output.strip() == f"error: index folder {tmp_path / 'nope'} not found"


def test_corrupt_manifest_is_named(tiny_index: Path, tmp_path: Path) -> None:
    broken = tmp_path / "idx"
    shutil.copytree(tiny_index, broken)
    (broken / "manifest.json").write_text("{")
    r = run("info", broken)
    assert r.exit_code == 1 and "manifest.json is corrupt" in r.output


def test_empty_folder_is_a_clear_error(tiny_encoder: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = run("index", "--encoder", tiny_encoder, "--source", tmp_path / "empty", "--out", tmp_path / "idx")
    assert r.exit_code == 1 and "no image files found" in r.output
    assert not (tmp_path / "idx").exists()


def test_bad_factory_string_is_refused_before_embedding(tiny_encoder: Path, image_folder: Path, tmp_path: Path) -> None:
    r = run("index", "--encoder", tiny_encoder, "--source", image_folder, "--out", tmp_path / "idx", "--index-type", "IVF9,Nonsense")
    assert r.exit_code == 1 and "invalid FAISS factory string" in r.output


def test_bad_search_and_build_settings_are_one_line(tiny_encoder: Path, tiny_index: Path, image_folder: Path, tmp_path: Path) -> None:
    query = image_folder / "bars" / "bars_001.png"
    for option, message in (("--nprobe", "nprobe must be >= 1, got 0"), ("--ef-search", "ef-search must be >= 1, got 0")):
        r = run("query", tiny_index, query, option, 0)
        assert r.exit_code == 1 and r.output.strip() == f"error: {message}"
    r = run("index", "--encoder", tiny_encoder, "--source", image_folder, "--out", tmp_path / "idx", "--memory-budget-gb", 0)
    assert r.exit_code == 1 and r.output.strip() == "error: memory budget must be positive, got 0.0 GB"
    assert not (tmp_path / "idx").exists()


def test_knn_eval_of_two_index_folders(tiny_index: Path) -> None:
    r = run("knn-eval", "--gallery-index", tiny_index, "--query-index", tiny_index, "-k", 1, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    # Every query finds itself at similarity 1: top-1 is exactly 100%.
    assert report["top1"] == 1.0 and report["queries"] == 48


def test_knn_eval_of_an_encoder_on_folders(tiny_encoder: Path, image_folder: Path, tmp_path: Path) -> None:
    png = tmp_path / "confusion.png"
    r = run("knn-eval", "--encoder", tiny_encoder, "--train", image_folder, "--test", image_folder, "-k", 1,
            "--confusion", png, "--linear-probe")
    assert r.exit_code == 0, r.output
    assert "top-1 100.00%" in r.output and "linear probe top-1" in r.output
    assert png.stat().st_size > 1000


def test_train_command_and_resume_conflict(image_folder: Path, tmp_path: Path) -> None:
    args = ["train", "--data", image_folder, "--out", tmp_path, "--arch", "resnet18", "--width", 8, "--stem", "small",
            "--image-size", 16, "--batch-size", 16, "--epochs", 1, "--knn-every", 0, "--no-progress",
            "--optimizer", "adamw", "--lr", 0.002, "--lr-scaling", "none"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "trained 1 epochs" in r.output and (tmp_path / "encoder.pt").exists()
    r = run("train", "--out", tmp_path, "--resume", "--data", image_folder, "--width", 16)
    assert r.exit_code == 1 and "width: 8 != 16" in r.output


def test_unknown_architecture_lists_known(image_folder: Path, tmp_path: Path) -> None:
    r = run("train", "--data", image_folder, "--out", tmp_path, "--arch", "vit")
    assert r.exit_code == 1
    assert r.output.strip() == "error: unknown architecture 'vit'; known: resnet18, resnet34, resnet50"


def test_whiten_writes_a_new_encoder_and_keeps_the_old(tiny_encoder: Path, image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    from retrieval import pretrained
    from retrieval.embed import open_collection
    from simclr import whitening
    from simclr.encoder import Encoder
    from simclr.images import read_image

    before = tiny_encoder.read_bytes()
    r = run("whiten", tiny_encoder, "--data", image_folder, "--out", tmp_path / "w.pt", "--device", "cpu")
    assert r.exit_code == 1 and "48 images are too few to fit a whitening of 64-d features" in r.output
    assert "nothing was written" in r.output and not (tmp_path / "w.pt").exists()
    monkeypatch.setattr(whitening, "MIN_IMAGES_PER_DIM", 0.25)
    # The images are streamed: only the sample of --max-images is read and embedded.
    embedded = []
    real = pretrained.embed_collection
    monkeypatch.setattr(pretrained, "embed_collection", lambda enc, coll, **kw: embedded.append(len(coll)) or real(enc, coll, **kw))
    r = run("whiten", tiny_encoder, "--data", image_folder, "--out", tmp_path / "w.pt", "--max-images", 20, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert embedded == [20] and "(fit on 20 images)" in r.output
    white, plain = Encoder.load(tmp_path / "w.pt"), Encoder.load(tiny_encoder)
    assert white.whitened and not plain.whitened and tiny_encoder.read_bytes() == before
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(white.features(x), plain.features(x)) and not torch.allclose(white.embed(x), plain.embed(x))
    # The same as fitting on the evenly spaced sample's images held in memory.
    coll = open_collection(str(image_folder))
    sample = whitening.evenly_spaced(torch.arange(len(coll)), 20).tolist()
    images = torch.stack([read_image(coll.paths[i], plain.spec.image_size, plain.spec.in_channels) for i in sample])
    plain.fit_whitening(images, max_images=20)
    assert torch.allclose(white.white_matrix, plain.white_matrix, atol=1e-4)
    r = run("whiten", tiny_encoder, "--data", image_folder, "--out", tmp_path / "w.pt")
    assert r.exit_code == 1 and "exists" in r.output and white.checksum == Encoder.load(tmp_path / "w.pt").checksum
    r = run("whiten", tmp_path / "w.pt", "--remove", "--out", tmp_path / "p.pt")
    assert r.exit_code == 0 and not Encoder.load(tmp_path / "p.pt").whitened
    # --pooling: the same weights, another embedding (the old whitening, fit for the old features, goes).
    r = run("whiten", tmp_path / "w.pt", "--pooling", "multiscale", "--remove", "--out", tmp_path / "m.pt")
    multi = Encoder.load(tmp_path / "m.pt")
    assert r.exit_code == 0, r.output
    assert (multi.spec.pooling, multi.dim, multi.whitened) == ("multiscale", 4 * (16 + 32) + 64, False)
    assert torch.allclose(multi.features(x)[:, -64:], plain.features(x), atol=1e-5)  # the last stage's block is the global pooling
    r = run("whiten", tmp_path / "w.pt", "--pooling", "max", "--out", tmp_path / "bad.pt")
    assert r.exit_code == 1 and "--pooling: unknown pooling 'max'; known: global, multiscale, pyramid" in r.output
    assert not (tmp_path / "bad.pt").exists()
    # --flip-average: the same weights, features averaged with the mirror image's.
    r = run("whiten", tmp_path / "w.pt", "--flip-average", "--remove", "--out", tmp_path / "f.pt")
    flipped = Encoder.load(tmp_path / "f.pt")
    assert r.exit_code == 0, r.output
    assert (flipped.spec.flip_average, flipped.whitened) == (True, False) and not plain.spec.flip_average
    assert torch.allclose(flipped.features(x), (plain.features(x) + plain.features(x.flip(-1))) / 2, atol=1e-5)


def test_a_folder_without_images_is_reported_and_the_other_queries_answered(tiny_index: Path, image_folder: Path, tmp_path: Path) -> None:
    empty = tmp_path / "emptydir"
    empty.mkdir()
    a, b = image_folder / "bars" / "bars_000.png", image_folder / "checks" / "checks_000.png"
    r = run("query", tiny_index, a, empty, b, "-k", 1, "--json")
    assert r.exit_code == 1
    rows = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert [row["query"] for row in rows] == [str(a), str(empty), str(b)]
    assert "hits" in rows[0] and "hits" in rows[2] and "no image files found" in rows[1]["error"]


def test_info_names_the_calibration_and_the_encoder(tiny_index: Path) -> None:
    r = run("info", tiny_index)
    assert r.exit_code == 0, r.output
    assert "resnet18 (small stem, width 8, 16px, 3ch, global pooling" in r.output and "anomaly    k=5" in r.output and "99th percentile of 48" in r.output
    # 48 items cannot estimate a 64-d covariance: the anomaly space falls back to raw features, and says so.
    assert "the 48 gallery items were too few to fit a whitening" in r.output


def test_the_strict_protocol_runs_end_to_end(image_folder: Path, tmp_path: Path) -> None:
    r = run("anomaly-eval", "--protocol", "strict", "--train", image_folder, "--test", image_folder, "--work", tmp_path / "w",
            "--epochs", 1, "-k", 3, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    assert result["protocol"] == "strict" and set(result["per_class"]) == {"bars", "checks", "stripes"}
    assert all(0.0 <= v <= 1.0 for v in result["per_class"].values()) and result["total_seconds"] > 0
    # One encoder per class, each trained on that class alone.
    for name in ("bars", "checks", "stripes"):
        assert (tmp_path / "w" / name / "encoder.pt").is_file()
    from simclr.encoder import Encoder

    assert Encoder.load(tmp_path / "w" / "bars" / "encoder.pt").spec.train_config["classes"] == ["bars"]


def test_the_strict_protocol_takes_an_mvtec_layout_and_embeds_at_each_encoders_size(
        image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # train/ holds the normal kind alone; test/ holds it and kinds never trained on (defects).
    shutil.copytree(image_folder / "bars", tmp_path / "train" / "bars")
    import retrieval.anomaly_eval as anomaly_eval

    seen = []
    features = anomaly_eval._features

    def recording(encoder, data):  # noqa: ANN001, ANN202
        seen.append((data.images.shape[-1], encoder.spec.image_size, len(data.images)))
        return features(encoder, data)

    monkeypatch.setattr(anomaly_eval, "_features", recording)
    result = anomaly_eval.evaluate_protocol("strict", str(tmp_path / "train"), str(image_folder), k=3, work=tmp_path / "w",
                                            epochs=1, device="cpu", progress=False)
    assert list(result.per_class) == ["bars"] and 0.0 <= result.per_class["bars"] <= 1.0
    # The gallery (16 bars) and the queries (all 48 test images, checks and stripes the anomalies),
    # each decoded at the size the class's encoder was trained at (a folder's: photo size, not 32 px).
    assert [(n, size == own) for size, own, n in seen] == [(16, True), (48, True)]
    assert seen[0][1] != 32


def test_the_strict_protocol_trains_each_class_as_train_does_by_default_or_to_a_budget(
        image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simclr.config import PROFILES

    monkeypatch.setitem(PROFILES["cpu-photos"], "minutes", 0.05)  # the device's default budget, made short
    args = ("anomaly-eval", "--protocol", "strict", "--train", image_folder, "--test", image_folder, "--work", tmp_path / "w",
            "-k", 3, "--device", "cpu", "--class", "bars", "--json")
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert list(json.loads(r.output[r.output.index("{"):])["per_class"]) == ["bars"]
    from simclr.encoder import Encoder

    encoder = tmp_path / "w" / "bars" / "encoder.pt"
    config = Encoder.load(encoder).spec.train_config
    assert config["minutes"] == 0.05 and config["epochs"] is None and config["classes"] == ["bars"]
    # Run again: the finished encoder is reused, not trained again.
    stamp = encoder.stat().st_mtime_ns
    assert run(*args, "--minutes", 0.05).exit_code == 0 and encoder.stat().st_mtime_ns == stamp
    r = run(*args, "--minutes", 1, "--epochs", 2)
    assert r.exit_code == 1 and "--epochs 2 and --minutes 1.0 both set" in r.output


def test_the_strict_protocol_trains_the_recipe_it_is_given_and_reuses_runs_of_train(
        image_folder: Path, tmp_path: Path) -> None:
    from simclr.encoder import Encoder

    work = tmp_path / "w"
    base = ("anomaly-eval", "--protocol", "strict", "--train", image_folder, "--test", image_folder, "--work", work,
            "-k", 3, "--device", "cpu", "--class", "bars", "--json")
    recipe = ("--stem", "small", "--width", 8, "--image-size", 16, "--batch-size", 4, "--pooling", "pyramid",
              "--crop-min", 0.9, "--rotation-negatives", "--seed", 3)
    r = run(*base, "--epochs", 1, *recipe)
    assert r.exit_code == 0, r.output
    first = json.loads(r.output[r.output.index("{"):])
    encoder = work / "bars" / "encoder.pt"
    spec = Encoder.load(encoder).spec
    config = spec.train_config
    assert (config["stem"], config["width"], config["image_size"], config["batch_size"], config["crop_min"],
            config["rotation_negatives"], config["seed"]) == ("small", 8, 16, 4, 0.9, True, 3)
    assert spec.pooling == "pyramid" and spec.image_size == 16
    # A run trained by retrieval train (here: the one above) is reused without its recipe
    # repeated, though the batch it was trained at is not the one anomaly-eval would pick (16).
    stamp = encoder.stat().st_mtime_ns
    r = run(*base)
    assert r.exit_code == 0, r.output
    assert encoder.stat().st_mtime_ns == stamp
    assert json.loads(r.output[r.output.index("{"):])["per_class"] == first["per_class"]
    # Asked for another recipe than the run in --work holds: one line naming the difference.
    r = run(*base, "--stem", "standard")
    assert r.exit_code == 1 and "belongs to another configuration (stem: 'small' != 'standard')" in r.output
    assert encoder.stat().st_mtime_ns == stamp
    r = run(*base, "--epochs", 1, "--pooling", "sideways")
    assert r.exit_code == 1 and "unknown pooling 'sideways'" in r.output


def test_the_strict_protocol_starts_each_class_from_the_encoder_it_is_given(
        image_folder: Path, tiny_encoder: Path, tmp_path: Path) -> None:
    from simclr.encoder import Encoder

    base = ("anomaly-eval", "--protocol", "strict", "--train", image_folder, "--test", image_folder, "-k", 3,
            "--device", "cpu", "--class", "bars", "--epochs", 1, "--init", tiny_encoder, "--json")
    r = run(*base, "--work", tmp_path / "w", "--stem", "small", "--width", 8, "--image-size", 16, "--batch-size", 4)
    assert r.exit_code == 0, r.output
    assert Encoder.load(tmp_path / "w" / "bars" / "encoder.pt").spec.train_config["init"] == str(tiny_encoder)
    r = run(*base, "--work", tmp_path / "v", "--stem", "standard", "--width", 8, "--image-size", 16, "--batch-size", 4)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "an encoder of resnet18, stem small, width 8, but this run builds resnet18, stem standard, width 8" in r.output


def test_train_and_strict_say_when_the_loss_ended_at_chance_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One kind of thing, every picture the same: the loss can only sit at chance level. retrieval
    train narrows its crops and says so, then warns with the way out left; anomaly-eval's strict
    protocol names the class (JSON and text)."""
    import numpy as np
    from PIL import Image

    from simclr import train as train_module
    from tests.helpers import pattern

    one = Image.fromarray(pattern("checks", np.random.default_rng(0)))
    for split, kinds in (("train", ["good"]), ("test", ["good", "dent"])):
        for kind in kinds:
            (tmp_path / split / kind).mkdir(parents=True)
            for i in range(24):
                (one if kind == "good" else one.rotate(90)).save(tmp_path / split / kind / f"{i:02d}.png")
    monkeypatch.setattr(train_module, "CHANCE_GRACE_STEPS", 6)  # (100 for real runs)
    tiny = ("--stem", "small", "--width", 8, "--image-size", 16, "--batch-size", 8)
    r = run("train", "--data", tmp_path / "train", "--out", tmp_path / "run", "--epochs", 4, "--optimizer", "adamw",
            "--lr", 0.002, "--lr-scaling", "none", "--head-hidden", 32, "--head-out", 16, "--pooling", "global",
            "--no-flip-average", "--knn-every", 0, "--no-progress", "--device", "cpu", *tiny)
    assert r.exit_code == 0, r.output
    assert "note: the NT-Xent loss was at chance level at step 6 " in r.output and "crops keep at least 90%" in r.output
    assert "warning: the NT-Xent loss is at chance level at step 12" in r.output and "--init" in r.output
    base = ("anomaly-eval", "--protocol", "strict", "--train", tmp_path / "train", "--test", tmp_path / "test",
            "--class", "good", "--work", tmp_path / "w", "-k", 3, "--device", "cpu", "--epochs", 4, *tiny)
    r = run(*base, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert report["at_chance"] == ["good"] and report["crops_narrowed_at"] == {"good": 6}
    r = run(*base)  # (the run in --work, reused: judged by its last epoch's loss)
    assert r.exit_code == 0 and "training ended at chance level (learned nothing from its views) for: good" in r.output
    assert "crops narrowed when the loss sat at chance level, for: good (step 6)" in r.output


def test_protocol_mistakes_are_one_line(image_folder: Path, tiny_encoder: Path, tmp_path: Path) -> None:
    r = run("anomaly-eval", "--protocol", "shared-encoder", "--train", image_folder, "--test", image_folder)
    assert r.exit_code == 1 and "needs --encoder" in r.output
    r = run("anomaly-eval", "--protocol", "nonsense", "--encoder", tiny_encoder)
    assert r.exit_code == 1 and "unknown protocol 'nonsense'; known: strict, shared-encoder, transductive" in r.output
    r = run("anomaly-eval", "--protocol", "shared-encoder", "--encoder", tiny_encoder, "--train", image_folder,
            "--test", image_folder, "-k", 20)
    assert r.exit_code == 1 and "class 'bars' has 16 training image(s), fewer than k + 1 = 21" in r.output
    r = run("anomaly-eval", "--protocol", "shared-encoder", "--encoder", tiny_encoder, "--train", image_folder,
            "--test", image_folder, "--stem", "small", "--rotation-negatives")
    assert r.exit_code == 1
    assert "--stem, --rotation-negatives: training options of the strict protocol; the shared-encoder protocol trains nothing" in r.output


def test_shared_encoder_protocol_scores_with_both_scores(image_folder: Path, tiny_encoder: Path) -> None:
    for score in ("index", "cosine"):
        r = run("anomaly-eval", "--protocol", "shared-encoder", "--encoder", tiny_encoder, "--train", image_folder,
                "--test", image_folder, "-k", 3, "--score", score, "--json")
        assert r.exit_code == 0, r.output
        result = json.loads(r.output[r.output.index("{"):])
        # Three textures an encoder was trained on: well above chance (0.5) either way.
        assert result["score"] == score and result["mean_auroc"] > 0.65, result
    r = run("anomaly-eval", "--protocol", "shared-encoder", "--encoder", tiny_encoder, "--train", image_folder,
            "--test", image_folder, "-k", 3, "--class", "bars", "--json")
    assert r.exit_code == 0 and list(json.loads(r.output[r.output.index("{"):])["per_class"]) == ["bars"]


def test_a_dangling_symlink_is_reported_under_its_own_name(tiny_encoder: Path, image_folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(image_folder / "bars", src / "bars")
    (src / "bars" / "gone-link.png").symlink_to(tmp_path / "moved-away.png")
    r = run("index", "--encoder", tiny_encoder, "--source", src, "--out", tmp_path / "idx", "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "gone-link.png: broken symbolic link (to " in r.output and "1 unreadable file(s) skipped" in r.output


def test_an_unknown_anomaly_space_is_refused_before_anything_is_written(tiny_encoder: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    r = run("index", "--encoder", tiny_encoder, "--source", image_folder, "--out", out, "--anomaly-space", "nonsense",
            "--workers", 0, "--no-progress")
    assert r.exit_code == 1 and "unknown anomaly space 'nonsense'; known: auto, features, joined" in r.output, r.output
    assert not out.exists()
    # joined for an encoder without a whitening (this one, from 48 images): refused before embedding.
    r = run("index", "--encoder", tiny_encoder, "--source", image_folder, "--out", out, "--anomaly-space", "joined",
            "--workers", 0, "--no-progress")
    assert r.exit_code == 1 and "--anomaly-space joined needs an encoder with a whitening" in r.output, r.output
    assert not out.exists()
    r = run("anomaly-eval", "--protocol", "shared-encoder", "--encoder", tiny_encoder, "--train", image_folder,
            "--test", image_folder, "--anomaly-space", "nonsense")
    assert r.exit_code == 1 and "unknown anomaly space 'nonsense'" in r.output, r.output
    # shared-encoder refits the encoder's whitening on each class, as an index of it would have
    # it: with 16 images a class there is none to join, and the refusal says so.
    from simclr.encoder import Encoder

    whitened = Encoder.load(tiny_encoder)
    whitened.fit_whitening(torch.randint(0, 256, (600, 3, 16, 16), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(0)))
    whitened.save(tmp_path / "whitened.pt")
    r = run("anomaly-eval", "--protocol", "shared-encoder", "--encoder", tmp_path / "whitened.pt", "--train",
            image_folder, "--test", image_folder, "-k", 3, "--anomaly-space", "joined")
    assert r.exit_code == 1 and "class 'bars': its 16 training images are too few to refit the encoder's whitening" in r.output, r.output
    r = run("anomaly-eval", "--protocol", "shared-encoder", "--encoder", tmp_path / "whitened.pt", "--train",
            image_folder, "--test", image_folder, "-k", 3, "--json")  # (auto: scored without it)
    assert r.exit_code == 0, r.output
    # strict trains an encoder per class: a joined space its encoders cannot have is refused
    # before the first one trains (16 images a class, or a recipe without a whitening).
    work = tmp_path / "strict"
    r = run("anomaly-eval", "--protocol", "strict", "--work", work, "--train", image_folder, "--test", image_folder,
            "-k", 3, "--epochs", 1, "--anomaly-space", "joined", "--device", "cpu")
    assert r.exit_code == 1 and "class 'bars': its 16 training images are too few to fit the whitening of its encoder" \
        in r.output, r.output
    from retrieval.anomaly_eval import evaluate_protocol

    with pytest.raises(RetrievalError, match=r"the recipe asks for none \(--no-whiten\)"):
        evaluate_protocol("strict", str(image_folder), str(image_folder), work=work, k=3, epochs=1, device="cpu",
                          train_options={"whiten": False}, anomaly_space="joined")
    assert not work.exists() or not any(work.iterdir())
