"""Plots the curves recorded by ``benchmarks/fra_dynamics.py`` (fra vs the reference, same batches).

    python benchmarks/fra_dynamics_plot.py benchmarks/fra_dynamics.json docs/fra_dynamics.png
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PANELS = (("total", "total loss"), ("inst", "instance loss (w·Σ)"), ("region", "region loss ((1−w)·Σ)"),
          ("cluster", "cluster loss"), ("dots_spread", "heat-map logit spread over K"),
          ("mask_cos", "mask-embedding mean pairwise cosine"))


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    curves, cfg = data["curves"], data["config"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for name, style in (("reference", dict(color="tab:orange", lw=2.5, alpha=0.6)),
                            ("fra", dict(color="tab:blue", lw=1.0))):
            ys = curves[name][key]
            ax.plot(range(len(ys)), ys, label=name, **style)
        if key == "cluster":
            ax.axhline(math.log(cfg["num_proto"]), color="grey", ls="--", lw=0.8, label="ln K")
            ax.ticklabel_format(useOffset=False)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(f"FRA dynamics, fra vs reference on the same batches: ResNet-18, {cfg['image_size']} px, "
                 f"K={cfg['num_proto']}, batch {cfg['batch_size']}, LARS lr {cfg['lr']}, teacher τ {cfg['teacher_temp']}, "
                 f"heat-map scale {cfg['heatmap_scale']}, {cfg.get('dtype', 'float32')}", fontsize=10)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=80)


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
