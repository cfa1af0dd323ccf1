"""Pretraining throughput: the plain loop vs Ray Train with 1 and 2 workers (issue 4).

Same model, data (synthetic faces, same augmentation) and global batch in every run. For each
run we report

* ``train img/s``: images / time spent outside data waits, per epoch (the Ray layer's cost on
  the training step itself: DDP, reports, checkpoints), epochs after the first;
* ``e2e img/s``: images / epoch wall time including data waits, epochs after the first;
* wall time of the whole call (start-up, data preparation, finalisation included).

Runs are interleaved and repeated (``--repeats``): on a shared machine the best steady epoch
is the least disturbed measurement of each configuration.

The plain loop uses one torch thread (Ray gives a 1-CPU worker ``OMP_NUM_THREADS=1``).

    python benchmarks/pretrain_scaling.py                   # ~15 min on 2 cores
    python benchmarks/pretrain_scaling.py --epochs 2 --images 160 --runs plain ray1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def config(args, storage: str, name: str, workers: int, source: str):
    from fra.config import PretrainConfig, from_dict

    ids = args.images // 8  # SyntheticFaces: 80 % of identities are train; 10 images each
    return from_dict(PretrainConfig, {
        "model": {"backbone": "resnet18", "hidden_dim": 256, "proj_dim": 128, "num_proto": 4, "decoder_heads": 4,
                  "decoder_ffn": 256},
        "optim": {"epochs": args.epochs, "warmup_epochs": 1, "batch_size": args.batch},
        "data": {"source": source, "image_size": args.image_size,
                 "synthetic": {"num_identities": ids, "images_per_identity": 10, "size": args.image_size}},
        "scaling": {"num_workers": workers, "max_failures": 0},
        "run": {"name": name, "storage_path": storage, "log_every": 0, "checkpoint_every": 0,
                "heatmaps_every_epoch": False},
        "tracking": {"enabled": False},
    })


def summarise(name: str, history: list[dict], wall: float) -> dict:
    steady = history[1:] or history
    train = [h["images_per_s"] / max(1e-9, 1 - h["data_wait_frac"]) for h in steady]
    return {"run": name, "epochs": len(history), "images": int(sum(h["images"] for h in history)),
            "train_img_s": train, "e2e_img_s": [h["images_per_s"] for h in steady],
            "data_wait": statistics.mean(h["data_wait_frac"] for h in steady), "wall_s": wall}


def run_plain(args, storage: str) -> dict:
    import torch

    from fra.train.plain import pretrain_plain

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = pretrain_plain(config(args, storage, "plain", 1, "synthetic"), progress=False)
    return summarise("plain loop", res.history, time.perf_counter() - t0)


def run_ray(args, storage: str, workers: int) -> dict:
    import ray

    from fra.train.ray_trainer import pretrain_ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)  # State API: Train's PG cleaner
        ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    out = pretrain_ray(config(args, storage, f"ray{workers}", workers, "synthetic"))
    return summarise(f"Ray Train, {workers} worker(s)", out.return_value["history"], time.perf_counter() - t0)


def table(rows: list[dict]) -> str:
    """One line per configuration: median and best steady epoch over all repeats."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["run"], []).append(r)

    def pool(name, key):
        return [v for r in groups[name] for v in r[key]]

    base = max(pool("plain loop", "train_img_s")) if "plain loop" in groups else None
    lines = ["| run | repeats × epochs × images | train img/s median (best) | e2e img/s median (best) | "
             "data wait | wall s (median) | best train vs plain |", "|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        tr, e2e = pool(name, "train_img_s"), pool(name, "e2e_img_s")
        rel = f"{100 * (max(tr) / base - 1):+.1f} %" if base else "–"
        lines.append(f"| {name} | {len(rs)} × {rs[0]['epochs']} × {rs[0]['images'] // rs[0]['epochs']} | "
                     f"{statistics.median(tr):.1f} ({max(tr):.1f}) | {statistics.median(e2e):.1f} ({max(e2e):.1f}) | "
                     f"{100 * statistics.mean(r['data_wait'] for r in rs):.0f} % | "
                     f"{statistics.median(r['wall_s'] for r in rs):.0f} | {rel} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=320, help="training images (synthetic faces)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--runs", nargs="+", default=["plain", "ray1", "ray2"], choices=["plain", "ray1", "ray2"])
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (the machine may be shared)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fra-bench-") as storage:
        for i, name in enumerate(args.runs * args.repeats):
            storage_i = f"{storage}/{i}"
            rows.append(run_plain(args, storage_i) if name == "plain" else run_ray(args, storage_i, int(name[-1])))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
