"""Resident memory of streamed training as the folder grows: `retrieval train --loader stream`
on each folder, its process tree (the trainer and its DataLoader workers) sampled twice a
second from /proc.

    python bench/make_photos.py bench/out/photos-200k --train 200000 --test 0
    python bench/photo_memory.py bench/out/photos-20k/train bench/out/photos-200k/train --minutes 1.5

For each folder: peak RSS of the trainer, peak RSS and PSS of the whole tree (PSS shares the
pages the forked workers have in common with the trainer), and the step count reached.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import write_report


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        todo.extend(int(c) for c in children)
    return out


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    rss = re.search(r"^Rss:\s+(\d+)", text, re.M)
    pss = re.search(r"^Pss:\s+(\d+)", text, re.M)
    return int(rss.group(1)) if rss else 0, int(pss.group(1)) if pss else 0


def measure(folder: str, minutes: float, work: Path) -> dict:
    out = work / Path(folder).parent.name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "retrieval", "train", "--data", folder, "--out", str(out), "--loader", "stream",
           "--minutes", str(minutes), "--no-whiten", "--knn-every", "0", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_main = peak_rss = peak_pss = 0
    samples = []
    while proc.poll() is None:
        pids = tree(proc.pid)
        mem = [memory_kb(p) for p in pids]
        main_rss = mem[0][0]
        rss, pss = sum(m[0] for m in mem), sum(m[1] for m in mem)
        peak_main, peak_rss, peak_pss = max(peak_main, main_rss), max(peak_rss, rss), max(peak_pss, pss)
        samples.append((round(time.perf_counter() - start, 1), main_rss // 1024, rss // 1024, pss // 1024, len(pids)))
        time.sleep(0.5)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"training on {folder} failed:\n{output}")
    steps = re.search(r"\((\d+) steps\)", output)
    images = sum(1 for _ in Path(folder).rglob("*.jpg"))
    return {
        "folder": folder, "images": images, "seconds": round(time.perf_counter() - start, 1),
        "steps": int(steps.group(1)) if steps else None,
        "peak_rss_trainer_mb": peak_main // 1024, "peak_rss_tree_mb": peak_rss // 1024, "peak_pss_tree_mb": peak_pss // 1024,
        "samples_s_trainer_tree_pss_procs": samples[:: max(1, len(samples) // 20)],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--minutes", type=float, default=1.5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path("bench/out/photo_memory")
    runs = [measure(f, args.minutes, work) for f in args.folders]
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "retrieval train --data FOLDER --loader stream --minutes M --no-whiten --knn-every 0",
        "runs": runs,
    }
    write_report(report, args.json)


if __name__ == "__main__":
    main()
