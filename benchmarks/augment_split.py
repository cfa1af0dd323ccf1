"""The augmentation split (issue 16 §1): ``data.augment_on: workers`` vs ``device``, measured on a CPU.

Three parts, on the same JPEGs as ``benchmarks/data_path.py`` (random face-sized crops of real
photos, 130-250 x 170-300 px, q90):

* ``worker``: images per CPU-second of the Ray Data task's own code (``fra.data.stream.
  _two_view_batch`` on batches of 32 encoded rows, one process, no Ray runtime) with
  ``augment_on: device`` (decode, crop, resize, flip, parameter table) and ``workers`` (whole
  views), against data_path's (c') floor: simplejpeg decode + two RandomResizedCrop resizes with
  the cheapest resize fra uses (OpenCV's bilinear when upsampling in both directions, else PIL's).
  The three alternate every 32 images; medians of ``--trials`` passes, ratios per pass.
* ``device``: CPU milliseconds per image (both views) of :class:`fra.data.device_augment.DeviceAugment`
  on batches of 64 real geometry views with their drawn parameters, one torch thread (a 1-CPU
  Ray Train worker's setting), per chunk size; and of the Normalizer that follows either placement.
* ``e2e`` (needs Ray: run it under the Ray lock): first the Ray Data stream alone with each
  placement (images per CPU-second of the whole process tree, data_path's protocol, on shards of
  the ``--images`` JPEGs), then a 1-worker ``fra pretrain`` on Ray Train (ResNet-18, hidden 256, K=4, global batch
  ``--batch``, ``--epochs`` epochs over ``--images`` images from Parquet shards) at each size with
  each placement, interleaved in one Ray session; images/s of the epochs after the first
  (``e2e``: the epoch's images / its wall time, data waits included; ``train``: excluding waits).

    python benchmarks/augment_split.py --out benchmarks/augment_split.json
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


# ---- worker side -----------------------------------------------------------------------------
def _task_cpu(rows: list[dict], size: int, augment_on: str) -> float:
    """CPU seconds of the Ray Data task function over ``rows`` (batches of encoded rows)."""
    from fra.data.stream import _two_view_batch

    kw = dict(image_size=size, seed=0, augment={}, with_params=False, with_masks=False, augment_on=augment_on)
    c0 = time.process_time()
    for r in rows:
        _two_view_batch(dict(r), **kw)
    return time.process_time() - c0


def part_worker(jpegs, sizes, trials: int, block: int = 32) -> dict:
    """The three measurements alternate every ``block`` images (rotating which goes first), so
    that the load of other jobs, which drifts over seconds, falls on all three alike."""
    import numpy as np

    from data_path import _floor_fast_worker

    blocks = [jpegs[i:i + block] for i in range(0, len(jpegs), block)]
    rows = [{"image": b, "label": np.zeros(len(b), np.int64), "path": [f"b{i}_{j}.jpg" for j in range(len(b))]}
            for i, b in enumerate(blocks)]
    names = ("floor_opencv_resize", "device_placement_task", "workers_placement_task")
    out = {}
    for size in sizes:
        fns = {names[0]: lambda i: _floor_fast_worker((blocks[i], size)),
               names[1]: lambda i: _task_cpu([rows[i]], size, "device"),
               names[2]: lambda i: _task_cpu([rows[i]], size, "workers")}
        for fn in fns.values():
            fn(0)  # warm-up
        runs = {k: [] for k in names}
        for _ in range(trials):
            cpu = dict.fromkeys(names, 0.0)
            for i in range(len(blocks)):
                order = names[i % 3:] + names[:i % 3]
                for k in order:
                    cpu[k] += fns[k](i)
            for k in names:
                runs[k].append(len(jpegs) / cpu[k])
        ratio = lambda k: [round(t / f, 3) for t, f in zip(runs[k], runs[names[0]])]  # noqa: E731
        out[size] = {"img_per_cpu_s_median": {k: round(statistics.median(v), 1) for k, v in runs.items()},
                     "trials": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                     "device_task_vs_floor_per_trial": ratio(names[1]),
                     "workers_task_vs_floor_per_trial": ratio(names[2]),
                     "device_task_vs_floor": statistics.median(ratio(names[1])),
                     "workers_task_vs_floor": statistics.median(ratio(names[2])),
                     "loadavg": round(os.getloadavg()[0], 1)}
        print(f"worker {size}px: {out[size]}", flush=True)
    return out


# ---- device side -----------------------------------------------------------------------------
def part_device(jpegs, sizes, trials: int, chunks=(0, 4, 8, 16)) -> dict:
    import numpy as np
    import torch

    from fra.data.device_augment import augment_batches
    from fra.data.stream import _two_view_batch
    from fra.engine import Normalizer

    torch.set_num_threads(1)
    out = {}
    for size in sizes:
        b = _two_view_batch({"image": jpegs[:64], "label": np.zeros(64, np.int64),
                             "path": [f"img{j}.jpg" for j in range(64)]}, image_size=size, seed=0, augment={},
                            with_params=False, with_masks=False, augment_on="device")
        batch = {k: torch.from_numpy(v) for k, v in b.items()}
        res = {}
        for chunk in chunks:
            from fra.data.device_augment import DeviceAugment

            aug = DeviceAugment("cpu", chunk=chunk)
            aug.apply_batch(batch)
            times = []
            for _ in range(trials):
                c0 = time.process_time()
                aug.apply_batch(batch)
                times.append(time.process_time() - c0)
            res[f"chunk_{chunk}"] = round(1000 * min(times) / 64, 2)
        norm = Normalizer()
        times = []
        for _ in range(trials):
            c0 = time.process_time()
            norm(batch["view1"].permute(0, 3, 1, 2)), norm(batch["view2"].permute(0, 3, 1, 2))
            times.append(time.process_time() - c0)
        res["normalizer_both_views"] = round(1000 * min(times) / 64, 3)
        next(augment_batches([batch]))  # the worker's call, default chunk
        out[size] = {"ms_per_image_both_views": res, "loadavg": round(os.getloadavg()[0], 1)}
        print(f"device {size}px: {out[size]}", flush=True)
    return out


# ---- end to end ------------------------------------------------------------------------------
def _pretrain_config(args, storage: str, shards: str, size: int, placement: str, name: str):
    from fra.config import PretrainConfig, from_dict

    return from_dict(PretrainConfig, {
        "model": {"backbone": "resnet18", "hidden_dim": 256, "proj_dim": 128, "num_proto": 4, "decoder_heads": 4,
                  "decoder_ffn": 256},
        "optim": {"epochs": args.epochs, "warmup_epochs": 1, "batch_size": args.batch},
        "data": {"source": "shards", "shards": shards, "image_size": size, "augment_on": placement},
        "scaling": {"num_workers": 1, "max_failures": 0},
        "run": {"name": name, "storage_path": storage, "log_every": 0, "checkpoint_every": 0,
                "heatmaps_every_epoch": False, "collapse_patience": 0},
        "tracking": {"enabled": False},
    })


def _shards(jpegs, root: Path, per_shard: int) -> str:
    from data_path import write_image_folder
    from fra.data.shards import write_shards

    write_image_folder(jpegs, root / "folder")
    write_shards("image_folder", str(root / "folder"), str(root / "shards"), images_per_shard=per_shard,
                 row_group_size=per_shard // 2, parallel=False, shuffle=True)
    return str(root / "shards")


def part_stream(shards: str, n: int, sizes) -> dict:
    """Images per CPU-second of the whole process tree (driver, Ray daemons, Ray Data tasks) while
    iterating the pretraining stream with each placement (data_path's protocol: a warm-up epoch,
    then the best of 3 epochs); the device placement's trainer-side ops are not in it (part ``device``)."""
    from data_path import _epochs
    from fra.data.stream import iter_batches, pretrain_dataset

    out: dict = {}
    for size in sizes:
        for placement in ("workers", "device"):
            ds = pretrain_dataset(shards, image_size=size, batch_size=32, augment_on=placement)
            r = _epochs(ds, lambda b: len(b["label"]), n,
                        iterate=lambda d, e: iter_batches(d, 64, epoch=e, drop_last=False))
            out.setdefault(size, {})[placement] = r
            print(f"stream {size}px {placement}: {r}", flush=True)
    return out


def part_e2e(args, jpegs, tmp: str, stream_jpegs=None) -> tuple[list[dict], dict]:
    import ray

    from fra.train.ray_trainer import pretrain_ray

    shards = _shards(jpegs, Path(tmp) / "e2e", 128)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    stream = {}
    if stream_jpegs:  # the Ray Data stream alone, in the same Ray session
        try:
            stream = part_stream(_shards(stream_jpegs, Path(tmp) / "stream", 250), len(stream_jpegs), args.sizes)
        except Exception as exc:  # noqa: BLE001 (a failed stream measurement must not cost the e2e runs)
            print(f"stream part failed: {exc!r}", flush=True)
    rows = []
    runs = [(size, placement) for size in args.sizes for placement in ("workers", "device")]
    for r in range(args.repeats):
        for size, placement in (runs if r % 2 == 0 else runs[::-1]):
            name = f"p{placement}_{size}_{r}"
            t0 = time.perf_counter()
            res = pretrain_ray(_pretrain_config(args, f"{tmp}/runs", shards, size, placement, name))
            hist = res.return_value["history"]
            steady = hist[1:] or hist
            row = {"size": size, "augment_on": placement, "repeat": r, "epochs": len(hist),
                   "images_per_epoch": int(hist[0]["images"]),
                   "e2e_img_s": [round(h["images_per_s"], 2) for h in steady],
                   "train_img_s": [round(h["images_per_s"] / max(1e-9, 1 - h["data_wait_frac"]), 2) for h in steady],
                   "data_wait": [round(h["data_wait_frac"], 3) for h in steady],
                   "wall_s": round(time.perf_counter() - t0, 1), "loadavg": round(os.getloadavg()[0], 1)}
            rows.append(row)
            print(f"e2e: {row}", flush=True)
    ray.shutdown()
    return rows, stream


def table(res: dict) -> str:
    lines = []
    if res.get("worker"):
        lines += ["| size | (c') floor: decode + 2 crops, OpenCV resize | device placement: task | task / floor "
                  "| workers placement: task | task / floor |", "|---|---|---|---|---|---|"]
        for size, w in res["worker"].items():
            b = w["img_per_cpu_s_median"]
            lines.append(f"| {size} | {b['floor_opencv_resize']:.0f} | {b['device_placement_task']:.0f} "
                         f"| **{w['device_task_vs_floor']:.0%}** | {b['workers_placement_task']:.0f} "
                         f"| {w['workers_task_vs_floor']:.0%} |")
    if res.get("device"):
        lines += ["", "| size | DeviceAugment ms/img (both views), chunk 0 / 4 / 8 / 16 | Normalizer ms/img |",
                  "|---|---|---|"]
        for size, d in res["device"].items():
            m = d["ms_per_image_both_views"]
            lines.append(f"| {size} | {m['chunk_0']} / {m['chunk_4']} / {m['chunk_8']} / {m['chunk_16']} "
                         f"| {m['normalizer_both_views']} |")
    if res.get("stream"):
        lines += ["", "| size | Ray Data stream, workers placement (img/CPU-s of the tree; wall) | device placement "
                  "| device / workers |", "|---|---|---|---|"]
        for size, st in res["stream"].items():
            w, d = st["workers"], st["device"]
            lines.append(f"| {size} | {w['img_per_cpu_s']:.0f} ({w['img_per_wall_s']:.0f} wall) "
                         f"| {d['img_per_cpu_s']:.0f} ({d['img_per_wall_s']:.0f} wall) "
                         f"| {d['img_per_cpu_s'] / w['img_per_cpu_s']:.2f}x |")
    if res.get("e2e"):
        lines += ["", "| size | augment_on | e2e img/s (epochs after the first; median, best) | train img/s "
                  "| data wait | wall s |", "|---|---|---|---|---|---|"]
        groups: dict = {}
        for r in res["e2e"]:
            groups.setdefault((r["size"], r["augment_on"]), []).append(r)
        for (size, placement), rs in sorted(groups.items()):
            e2e = [v for r in rs for v in r["e2e_img_s"]]
            tr = [v for r in rs for v in r["train_img_s"]]
            dw = [v for r in rs for v in r["data_wait"]]
            lines.append(f"| {size} | {placement} | {statistics.median(e2e):.1f} ({max(e2e):.1f}) "
                         f"| {statistics.median(tr):.1f} | {100 * statistics.mean(dw):.0f} % "
                         f"| {statistics.median(r['wall_s'] for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["worker", "device", "e2e"], choices=["worker", "device", "e2e"])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 112])
    p.add_argument("--images", type=int, default=600, help="JPEGs for the worker/device parts")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--e2e-images", type=int, default=384, help="training images of the e2e runs")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs of the e2e runs (1 for the trainer)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from data_path import make_jpegs

    res: dict = {"loadavg_start": os.getloadavg(), "nproc": os.cpu_count(), "args": vars(args) | {"out": str(args.out)}}
    jpegs = make_jpegs(max(args.images, args.e2e_images if "e2e" in args.parts else 0))
    if "worker" in args.parts:
        res["worker"] = part_worker(jpegs[:args.images], args.sizes, args.trials)
    if "device" in args.parts:
        res["device"] = part_device(jpegs[:args.images], args.sizes, args.trials)
    if "e2e" in args.parts:
        with tempfile.TemporaryDirectory(prefix="fra-augsplit-") as tmp:
            res["e2e"], res["stream"] = part_e2e(args, jpegs[:args.e2e_images], tmp, jpegs[:args.images])
    res["loadavg_end"] = os.getloadavg()
    if args.out:  # parts run separately (e2e under the Ray lock) accumulate in one file
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        runs = old.pop("runs", []) + [{k: res[k] for k in ("loadavg_start", "loadavg_end", "args")}]
        old.update({k: v for k, v in res.items() if k in args.parts or (k == "stream" and "e2e" in args.parts)},
                   nproc=res["nproc"], runs=runs)
        args.out.write_text(json.dumps(old, indent=1) + "\n")
        res = old
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
