"""The three region-branch curves of the region-awareness experiment, next to the knob probes.

Reads ``runs/region_awareness/results.json`` (the experiment's per-epoch means, drawn at each
epoch's middle step), ``benchmarks/region_probe.json`` (short probes, every 5 steps) and the fra
side of ``benchmarks/fra_dynamics.json`` (the reference recipe, teacher temperature 0.04) and draws
cluster loss / ln K (with the 0.9 criterion), the spread of the heat-map logits over K and the mean
pairwise cosine of the mask embeddings against the training step.

    python benchmarks/region_plot.py --out docs/region_awareness_curves.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PANELS = (("cluster_over_lnk", "cluster loss / ln K"), ("dots_spread", "heat-map logit spread over K"),
          ("mask_cos", "mask-embedding pairwise cosine"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(REPO / "runs" / "region_awareness" / "results.json"))
    ap.add_argument("--probes", default=str(REPO / "benchmarks" / "region_probe.json"))
    ap.add_argument("--dynamics", default=str(REPO / "benchmarks" / "fra_dynamics.json"))
    ap.add_argument("--out", default=str(REPO / "docs" / "region_awareness_curves.png"))
    args = ap.parse_args(argv)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    dyn = json.loads(Path(args.dynamics).read_text())["curves"]["fra"]
    steps = list(range(len(dyn["cluster_over_lnk"])))
    for ax, (key, _) in zip(axes, PANELS):
        ax.plot(steps, dyn[key], color="0.6", lw=0.8, label="reference recipe (τt 0.04, m 0.996), per step")
    styles = {"base_momentum=0.98": ("tab:orange", "probe τt 0.01, m 0.98"), "loss_w_cluster=0.5": None}
    for probe in json.loads(Path(args.probes).read_text())["probes"]:
        cmd = probe["command"]
        if "loss_w_cluster" in cmd:
            color, label = "tab:purple", "probe τt 0.01, λc 0.5" + (", m 0.98" if "momentum" in cmd else "")
            ls = "--" if "momentum" in cmd else ":"
        elif "base_momentum=0.98" in cmd:
            (color, label), ls = styles["base_momentum=0.98"], "--"
        else:
            color, label, ls = "tab:blue", "probe τt 0.01, m 0.996 (pipeline before)", "--"
        rows = probe["rows"]
        for ax, (key, _) in zip(axes, PANELS):
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], ls, color=color, lw=1, label=label)
    results = json.loads(Path(args.results).read_text())
    for (name, cell), color in zip(sorted(results["cells"].items()), ("tab:red", "tab:green")):
        per = cell["steps"] / len(cell["epochs"])
        xs = [(h["epoch"] + 0.5) * per for h in cell["epochs"]]
        for ax, (key, _) in zip(axes, PANELS):
            ax.plot(xs, [h[f"diag/{key}"] for h in cell["epochs"]], "o-", color=color, lw=1.5, ms=4,
                    label=f"experiment seed {cell['seed']}, epoch means")
    for ax, (key, title) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].axhline(0.9, color="k", lw=0.8, ls="-.", label="criterion 0.9")
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
