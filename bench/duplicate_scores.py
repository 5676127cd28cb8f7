"""Which pixel score tells altered copies from distinct look-alikes? A sweep on a constructed set.

    python bench/duplicate_scores.py --bases 3000 --json bench/out/duplicate_scores/fm.json
    python bench/duplicate_scores.py --source bench/out/photos/test --bases 2000 --json bench/out/duplicate_scores/photos.json

The set is ``bench/duplicates.py constructed``'s, held in memory (no files, no index): every
image of the source, ``--bases`` of them with 0-3 altered copies each. Candidate pairs are each
item's ``--k`` nearest neighbours by the correlation of whole 16 x 16 thumbnails (so the sweep
does not depend on an encoder); each variant scores every candidate pair, and each score is
swept over every threshold, pair by pair: recall (of all true pairs of the set) at precision
>= 0.95, and the true pairs' low percentiles against the false pairs' high ones.

Variants: the product's score (:func:`retrieval.pixel_match.pair_scores`) with and without its
turns, with other turns or other crops of the turned images; and research variants (torch's
``grid_sample`` for every crop and turn, bilinear) that differ in what is compared: the stored
24-px thumbnail or one blurred to the pair's common resolution (the smaller of the two images'
own sides: a 14-px copy and a 28-px original are compared as two 14-px pictures, two 28-px
originals at all the detail they hold), the size of the compared signature, the alignments
searched, and a term for the pairs' detail (each image less its Gaussian blur).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.alterations import COMPOUND_RANGES, DEFAULT_RANGES, alter  # noqa: E402
from retrieval.pixel_match import THUMB, pair_scores, thumbnail  # noqa: E402

CROPS = ((0.0, 0.0),) + tuple((c, o) for c in (0.05, 0.10) for o in (0.0, 0.5, 1.0))


def build_set(source: str, bases: int, seed: int, ranges):  # noqa: ANN001
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from duplicates import source_images

    loaders, _ = source_images(source)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(loaders))
    thumbs, sides, group, copy = [], [], [], []
    for g, i in enumerate(order):
        im = loaders[i]()
        ims = [im]
        if g < bases:
            ims += [alter(im, rng, ranges)[0] for _ in range(int(rng.integers(0, 4)))]
        for c, x in enumerate(ims):
            thumbs.append(thumbnail(x))
            sides.append(min(x.size))
            group.append(g)
            copy.append(c > 0)
    return np.stack(thumbs), np.array(sides), np.array(group), np.array(copy)


def whole_signatures(thumbs: np.ndarray, size: int = 16) -> np.ndarray:
    x = torch.from_numpy(thumbs.reshape(-1, 1, THUMB, THUMB).astype(np.float32))
    s = F.interpolate(x, size=(size, size), mode="area").reshape(len(x), -1)
    s = s - s.mean(1, keepdim=True)
    return (s / s.norm(dim=1, keepdim=True).clamp_min(1e-6)).numpy()


def candidates(thumbs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sig = torch.from_numpy(whole_signatures(thumbs))
    a, b = [], []
    for s in range(0, len(sig), 2048):
        sim = sig[s : s + 2048] @ sig.T
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -2
        nn = sim.topk(k, dim=1).indices
        a.append(np.repeat(np.arange(s, s + len(sim)), k))
        b.append(nn.reshape(-1).numpy())
    a, b = np.concatenate(a), np.concatenate(b)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = np.unique(lo.astype(np.int64) * len(thumbs) + hi)
    return key // len(thumbs), key % len(thumbs)


def _blur(x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Each thumbnail (n, 1, T, T) squeezed to its ``side`` (when under T) and stretched back."""
    out = x.clone()
    for s in side.unique().tolist():
        if s >= THUMB:
            continue
        m = side == s
        small = F.interpolate(x[m], size=(s, s), mode="area")
        out[m] = F.interpolate(small, size=(THUMB, THUMB), mode="bilinear", align_corners=False)
    return out


def _views(x: torch.Tensor, size: int, angles: tuple[float, ...]) -> torch.Tensor:
    """(n, v, size * size): every crop of CROPS x CROPS at every angle, as zero-mean unit vectors."""
    thetas = []
    for ang in angles:
        r = np.deg2rad(ang)
        rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
        for cy, oy in CROPS:
            for cx, ox in CROPS:
                # the crop's centre and half-extent in [-1, 1] coordinates
                sx, sy = 1 - cx, 1 - cy
                tx, ty = -1 + 2 * cx * ox + sx, -1 + 2 * cy * oy + sy
                m = rot @ np.diag([sx, sy])
                thetas.append([[m[0, 0], m[0, 1], tx], [m[1, 0], m[1, 1], ty]])
    theta = torch.tensor(thetas, dtype=torch.float32)
    n, v = len(x), len(theta)
    grid = F.affine_grid(theta, (v, 1, size, size), align_corners=False)
    out = F.grid_sample(x.expand(n, v, THUMB, THUMB).reshape(n * v, 1, THUMB, THUMB), grid.repeat(n, 1, 1, 1),
                        mode="bilinear", padding_mode="border", align_corners=False)
    out = out.reshape(n, v, size * size)
    out = out - out.mean(2, keepdim=True)
    return out / out.norm(dim=2, keepdim=True).clamp_min(1e-6)


def _gauss(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (r, r, r, r), mode="replicate")
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))


def variant_scores(thumbs, sides, a, b, size, angles, match_res, highpass=None, batch=256):  # noqa: ANN001
    """The best correlation over every view of either image against the other whole, the pair
    blurred to its common side first when ``match_res``. With ``highpass`` (weight, sigma), plus
    that weight times the correlation of the pair's detail (each image less its Gaussian blur)
    at the view the whole images chose."""
    out = np.empty(len(a), np.float32)
    t = torch.from_numpy(thumbs.reshape(-1, 1, THUMB, THUMB).astype(np.float32))
    side = torch.from_numpy(np.minimum(sides, THUMB))
    for s in range(0, len(a), batch):
        pa, pb = torch.from_numpy(a[s : s + batch]), torch.from_numpy(b[s : s + batch])
        xa, xb = t[pa], t[pb]
        if match_res:
            common = torch.minimum(side[pa], side[pb])
            xa, xb = _blur(xa, common), _blur(xb, common)
        va, vb = _views(xa, size, angles), _views(xb, size, angles)
        wa, wb = va[:, 0], vb[:, 0]  # view 0: the whole image, no turn (angles[0] must be 0)
        ab = torch.einsum("pvd,pd->pv", va, wb)
        ba = torch.einsum("pvd,pd->pv", vb, wa)
        best = torch.maximum(ab.amax(1), ba.amax(1))
        if highpass is not None:
            weight, sigma = highpass
            ha, hb = _views(xa - _gauss(xa, sigma), size, angles), _views(xb - _gauss(xb, sigma), size, angles)
            r = torch.arange(len(pa))
            hab = torch.einsum("pvd,pd->pv", ha, hb[:, 0])[r, ab.argmax(1)]
            hba = torch.einsum("pvd,pd->pv", hb, ha[:, 0])[r, ba.argmax(1)]
            best = best + weight * torch.where(ab.amax(1) >= ba.amax(1), hab, hba)
        out[s : s + len(pa)] = best.numpy()
    return out


def summary(score: np.ndarray, true: np.ndarray, all_true: int) -> dict:
    order = np.argsort(-score, kind="stable")
    tp = np.cumsum(true[order])
    prec = tp / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(prec >= 0.95)
    best = int(ok.max()) if len(ok) else -1
    rec = tp[best] / all_true if best >= 0 else 0.0
    return {"recall_at_p95": round(float(rec), 4), "threshold_at_p95": float(score[order[best]]) if best >= 0 else None,
            "true_p1": float(np.percentile(score[true], 1)), "true_p5": float(np.percentile(score[true], 5)),
            "false_p99": float(np.percentile(score[~true], 99)), "false_p999": float(np.percentile(score[~true], 99.9))}


VARIANTS = {
    "crops (the score before)": "before",
    "crops and turns (the score now)": "now",
    "crops and two turns, 3 degrees either way": {"turns": (-3.0, 3.0)},
    "crops and turns, every crop of the turned images (49)": {"turn_crops": "all"},
    "crops and turns, centred crops of the turned images (9)": {"turn_crops": ((0.0, 0.0), (0.05, 0.5), (0.10, 0.5))},
    "16 px, crops": dict(size=16, angles=(0.0,), match_res=False),
    "16 px, crops and turns": dict(size=16, angles=(0.0, -4.0, -2.0, 2.0, 4.0), match_res=False),
    "16 px, common resolution, crops": dict(size=16, angles=(0.0,), match_res=True),
    "20 px, common resolution, crops": dict(size=20, angles=(0.0,), match_res=True),
    "20 px, common resolution, crops and turns": dict(size=20, angles=(0.0, -4.0, -2.0, 2.0, 4.0), match_res=True),
    "24 px, common resolution, crops and turns": dict(size=24, angles=(0.0, -4.0, -2.0, 2.0, 4.0), match_res=True),
    "20 px, common resolution, crops and turns, + 0.05 x detail (sigma 2)":
        dict(size=20, angles=(0.0, -4.0, -2.0, 2.0, 4.0), match_res=True, highpass=(0.05, 2.0)),
    "20 px, common resolution, crops and turns, + 0.2 x detail (sigma 1)":
        dict(size=20, angles=(0.0, -4.0, -2.0, 2.0, 4.0), match_res=True, highpass=(0.2, 1.0)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="fashion-mnist:test")
    p.add_argument("--bases", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--alterations", choices=("default", "compound"), default="default")
    p.add_argument("--variant", action="append", help="only these variants (names as in VARIANTS)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    ranges = COMPOUND_RANGES if args.alterations == "compound" else DEFAULT_RANGES
    thumbs, sides, group, copy = build_set(args.source, args.bases, args.seed, ranges)
    counts = np.bincount(group)
    all_true = int((counts * (counts - 1) // 2).sum())
    a, b = candidates(thumbs, args.k)
    true = group[a] == group[b]
    print(f"{len(thumbs)} items, {all_true} true pairs; {len(a)} candidates hold {true.sum()} "
          f"({true.sum() / all_true:.3f}); {time.perf_counter() - t0:.1f}s", flush=True)
    report = {"source": args.source, "bases": args.bases, "items": len(thumbs), "true_pairs": all_true,
              "candidates": len(a), "candidate_recall": float(true.sum() / all_true), "variants": {}}
    for name, cfg in VARIANTS.items():
        if args.variant and name not in args.variant:
            continue
        t = time.perf_counter()
        if cfg == "before":
            score = before = pair_scores(thumbs, a, b, turns=False)
        elif cfg == "now":
            score = pair_scores(thumbs, a, b)
        elif "turns" in cfg or "turn_crops" in cfg:  # the score now with other turns, or other crops of them
            from retrieval import pixel_match

            saved = pixel_match.TURNS, pixel_match._TURN_CROPS
            crops = cfg.get("turn_crops")
            pixel_match.TURNS = cfg.get("turns", pixel_match.TURNS)
            if crops is not None:
                pixel_match._TURN_CROPS = pixel_match._CropSet(pixel_match.CROPS if crops == "all" else crops)
            score = pair_scores(thumbs, a, b)
            pixel_match.TURNS, pixel_match._TURN_CROPS = saved
        else:
            score = variant_scores(thumbs, sides, a, b, **cfg)
        res = summary(score, true, all_true) | {"seconds": round(time.perf_counter() - t, 1)}
        if cfg == "now" and "crops (the score before)" in report["variants"]:
            lift = score - before
            res["lift_max_true"] = float(lift[true].max())
            res["lift_max_false"] = float(lift[~true].max())
            res["lift_true_p99"] = float(np.percentile(lift[true], 99))
        report["variants"][name] = res
        print(f"{name:<45} {json.dumps(res)}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
