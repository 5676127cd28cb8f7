"""Training metrics: one JSON line per record, and a PNG of the curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSONL log; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)

    def write(self, **record: Any) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, png: Path, chance: float | None = None) -> None:
        """Loss and learning rate per step, kNN accuracy per epoch; ``chance``: the loss's chance
        level (simclr.loss.chance_loss), drawn as a dashed line."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plotting is a convenience, never a reason to stop training
            return
        steps = [r for r in self.records if r.get("kind") == "step"]
        epochs = [r for r in self.records if r.get("kind") == "epoch" and r.get("knn_top1") is not None]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps])
        if chance is not None:
            axes[0].axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance level ({chance:.2f})")
        for r in self.records:
            if r.get("kind") == "crops":  # (the trainer narrowed the crops there, at chance level)
                axes[0].axvline(r["step"], color="tab:red", linestyle=":", linewidth=1,
                                label=f"crops from {r['crop_min']:.0%} (step {r['step']})")
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(loc="upper right", fontsize=8)
        axes[0].set(title="NT-Xent loss", xlabel="step")
        axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange")
        axes[1].set(title="learning rate", xlabel="step")
        axes[2].plot([r["epoch"] for r in epochs], [100 * r["knn_top1"] for r in epochs], marker="o", color="tab:green")
        axes[2].set(title="kNN top-1 (%)", xlabel="epoch")
        if not epochs:  # (an empty panel would show a scale of -0.04 to 0.04)
            axes[2].text(0.5, 0.5, "no kNN monitor in this run\n(no labels, or --knn-every 0)", ha="center", va="center",
                         transform=axes[2].transAxes, color="grey")
            axes[2].set(xticks=[], yticks=[])
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = png.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(png)
