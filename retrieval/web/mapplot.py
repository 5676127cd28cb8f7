"""The embedding map drawn as an image: the gallery's points coloured by label, the query as a star.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state), so that it is the same
picture in any browser and a query is never hidden among thousands of gallery points.
"""

from __future__ import annotations

import threading

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

# Tableau 10, then its paler half: distinct colours for up to 20 classes (they repeat after that).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5"]
MAX_LEGEND = 20


class MapPlot:
    """Renders the map; one figure, redrawn per query under a lock.

    Args:
        xy: (m, 2) gallery coordinates.
        labels: m labels (None: unlabelled).
    """

    def __init__(self, xy: np.ndarray, labels: list[str | None], size: tuple[float, float] = (11.0, 4.2), dpi: int = 100):
        self.xy = np.asarray(xy, dtype=np.float64)
        self.fig = Figure(figsize=size, dpi=dpi, layout="constrained")
        self.canvas = FigureCanvasAgg(self.fig)
        self.ax = self.fig.add_subplot()
        names = [lbl if lbl is not None else "unlabelled" for lbl in labels]
        classes = sorted(set(names))
        for i, name in enumerate(classes):
            rows = np.array([n == name for n in names])
            self.ax.scatter(self.xy[rows, 0], self.xy[rows, 1], s=9, color=PALETTE[i % len(PALETTE)], alpha=0.6,
                            linewidths=0, label=name if i < MAX_LEGEND else None)
        self.star = self.ax.scatter([], [], marker="*", s=420, color="black", edgecolors="white", linewidths=1.2,
                                    zorder=5, label="query")
        self.ax.set_xticks([])
        self.ax.set_yticks([])
        legend = self.ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
        for handle in legend.legend_handles:
            handle.set_sizes([160 if handle is legend.legend_handles[-1] else 40])
        self._lock = threading.Lock()

    def render(self, position: tuple[float, float] | None = None) -> Image.Image:
        """The map, with the query's star at ``position`` when given (the view widens to include it)."""
        with self._lock:
            pts = self.xy if position is None else np.vstack([self.xy, np.asarray(position, np.float64)[None]])
            lo, hi = pts.min(0), pts.max(0)
            pad = 0.04 * np.maximum(hi - lo, 1e-9)
            self.ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            self.ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            self.star.set_offsets(np.empty((0, 2)) if position is None else np.asarray([position], np.float64))
            self.canvas.draw()
            return Image.fromarray(np.asarray(self.canvas.buffer_rgba())[..., :3].copy())
