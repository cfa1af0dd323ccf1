"""Data-path throughput and memory: fra's Ray Data pipeline vs. the reference's DataLoader.

Images/s of "decode + two pretraining views", at each image size, for
  (a) fra: Ray Data ``read_parquet`` -> ``map_batches`` (simplejpeg + the fused PIL/OpenCV transform,
      uint8 views) -> ``iter_batches`` (torch), second (warm) epoch;
  (a0) the same transform in one process, no Ray (what (a) costs without Ray's overhead);
  (b) the reference: torch ``DataLoader`` over an ``ImageFolder`` of the same JPEGs with the
      reference's PIL / torchvision v1 transforms (FRA_SPEC §8, PIL blur, ToTensor + Normalize);
  (c) the floor: simplejpeg decode + two RandomResizedCrop resizes (PIL, the reference's crop
      op), nothing else;
  (c') the same with the cheapest resizes fra's transform uses (OpenCV's bilinear when the crop
      is upsampled in both directions, PIL's antialiased one otherwise).
Each phase runs in its own process; the headline figure is images per CPU-second of that
process and all its descendants (Ray daemons and workers, DataLoader workers), i.e. the
per-core rate, which stays meaningful on a shared machine where wall time does not. Each phase
times 3 repetitions (epochs) and the phases alternate over ``--rounds``; the best is kept, as
other jobs' load only ever slows a run down. Wall-clock rates are reported too. Finally the peak memory (driver RSS, total PSS of the process tree)
while streaming growing datasets at 112 px.

    python benchmarks/data_path.py --images 1500 --sizes 224 112 --cpus 2 --rounds 2 --rss-rows 10000 20000 50000
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

CLK = os.sysconf("SC_CLK_TCK")
IDLE_SECONDS = 5.0
TRIALS = 3  # timed repetitions per phase (epochs for the loaders); the best is reported


# ---- /proc helpers (no psutil dependency) --------------------------------------------------
def _tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK  # utime, stime
    return total


def tree_cpu() -> float:
    return _cpu_seconds(_tree(os.getpid()))


def tree_cpu_split() -> dict:
    """CPU-s of this process, of Ray worker processes (``ray::*``) and of everything else below
    it (Ray's daemons: gcs_server, raylet, agents, log monitor; DataLoader workers)."""
    out = {"driver": 0.0, "ray_workers": 0.0, "other": 0.0}
    for pid in _tree(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        kind = "driver" if pid == os.getpid() else "ray_workers" if cmd.startswith(b"ray::") else "other"
        out[kind] += _cpu_seconds([pid])
    return out


def _rollup_kib(pid: int) -> dict:
    """Pss and private (clean + dirty) memory of one process, from smaps_rollup."""
    out = {"pss": 0, "private": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "Pss":
                out["pss"] += int(rest.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                out["private"] += int(rest.split()[0])
    except OSError:
        pass
    return out


def _status_kib(pid: int, keys=("VmRSS", "RssAnon", "RssShmem")) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            out[key] = int(rest.split()[0])
    return out


# ---- test images -----------------------------------------------------------------------------
def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Random face-sized crops of real photos, resized to 130-250 x 170-300 px, q90 (DATA_NOTES §3)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from fra.data.decode import encode_jpeg

    sources = [data.astronaut(), data.chelsea(), data.coffee(), np.stack([data.camera()] * 3, -1)]
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            sources.append(np.asarray(Image.open(fh).convert("RGB")))
    except Exception:  # noqa: BLE001 - optional source
        pass
    sources += [data.rocket(), data.hubble_deep_field()]
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        src = sources[i % len(sources)]
        h0, w0 = src.shape[:2]
        cw, ch = int(rng.integers(min(130, w0 // 2), min(250, w0))), int(rng.integers(min(170, h0 // 2), min(300, h0)))
        x, y = int(rng.integers(0, w0 - cw + 1)), int(rng.integers(0, h0 - ch + 1))
        crop = Image.fromarray(src[y : y + ch, x : x + cw])
        tw, th = int(rng.integers(130, 251)), int(rng.integers(170, 301))
        out.append(encode_jpeg(np.asarray(crop.resize((tw, th), Image.BILINEAR)), quality=90))
    return out


def write_image_folder(jpegs: list[bytes], root: Path) -> None:
    for i, data in enumerate(jpegs):
        d = root / "train" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(data)


def write_repeated_shards(jpegs: list[bytes], out: Path, rows_list: list[int], per_shard: int = 1000) -> dict:
    """Shards of ``max(rows_list)`` rows cycling through ``jpegs`` (unique paths), one manifest per size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fra.data.manifest import Manifest, ShardInfo, write_manifest
    from fra.data.shards import SHARD_SCHEMA, parquet_options

    shards, total = [], max(rows_list)
    (out / "train").mkdir(parents=True, exist_ok=True)
    for s in range(0, total, per_shard):
        n = min(per_shard, total - s)
        cols = {name: [None] * n for name in SHARD_SCHEMA.names}
        cols.update(image=[jpegs[(s + i) % len(jpegs)] for i in range(n)], label=[(s + i) % 10 for i in range(n)],
                    split=["train"] * n, path=[f"img{s + i:07d}.jpg" for i in range(n)], format=["jpeg"] * n,
                    width=[0] * n, height=[0] * n)
        rel = f"train/part-{s // per_shard:05d}.parquet"
        pq.write_table(pa.Table.from_pydict(cols, schema=SHARD_SCHEMA), out / rel, **parquet_options(per_shard))
        payload = (out / rel).read_bytes()
        shards.append(ShardInfo(rel, "train", n, len(payload), hashlib.sha256(payload).hexdigest()))
    uris = {}
    for rows in rows_list:
        chosen = tuple(shards[: -(-rows // per_shard)])
        m = Manifest(1, "bench", "", "bench", (), {"train": {"total": rows, "classes": {}}}, chosen,
                     parquet={"row_group_size": per_shard})
        uris[rows] = write_manifest(m, str(out / f"manifest-{rows}.json"))
    return uris


# ---- phases (each in its own process) -----------------------------------------------------------
def _floor_worker(job, fast: bool = False) -> float:
    import numpy as np
    import simplejpeg
    from PIL import Image

    from fra.data.augment import _cv2, random_resized_crop_box

    cv2 = _cv2()
    jpegs, size = job
    rng = np.random.default_rng(0)
    c0 = time.process_time()
    for data in jpegs:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
        img = Image.fromarray(arr)
        for _ in range(2):
            box = random_resized_crop_box(img.width, img.height, (0.2, 1.0), (3 / 4, 4 / 3), rng)
            if fast and box[2] - box[0] <= size and box[3] - box[1] <= size:
                cv2.resize(arr[box[1]:box[3], box[0]:box[2]], (size, size), interpolation=cv2.INTER_LINEAR)
            else:
                np.asarray(img.resize((size, size), Image.BILINEAR, box=box))
    return time.process_time() - c0


def _floor_fast_worker(job) -> float:
    return _floor_worker(job, fast=True)


def _fra_worker(job) -> float:
    import numpy as np

    from fra.data.augment import TwoViewTransform
    from fra.data.decode import decode_pil

    jpegs, size = job
    t, rng = TwoViewTransform(size), np.random.default_rng(0)
    c0 = time.process_time()
    for data in jpegs:
        t(decode_pil(data), rng)
    return time.process_time() - c0


def _in_processes(worker, jpegs, size, procs: int) -> dict:
    """Run ``worker`` over ``jpegs`` split across ``procs`` processes at once (the same contention
    as ``procs`` Ray or DataLoader workers); CPU time is summed over the processes."""
    import multiprocessing as mp

    jobs = [(jpegs[i::procs], size) for i in range(procs)]
    worker(jobs[0])  # warm-up (imports, caches) in the parent before forking
    trials = []
    with mp.get_context("fork").Pool(procs) as pool:
        for _ in range(TRIALS):
            t0 = time.perf_counter()
            cpu = sum(pool.map(worker, jobs))
            trials.append(_rates(len(jpegs), cpu, time.perf_counter() - t0))
    return _best(trials)


def phase_floor(jpegs, size, args) -> dict:
    return _in_processes(_floor_worker, jpegs, size, args.procs)


def phase_floor_fast(jpegs, size, args) -> dict:
    return _in_processes(_floor_fast_worker, jpegs, size, args.procs)


def phase_fra_local(jpegs, size, args) -> dict:
    return _in_processes(_fra_worker, jpegs, size, args.procs)


def phase_reference(jpegs, size, args) -> dict:
    import random

    import torch
    import torchvision.transforms as T
    from PIL import ImageFilter, ImageOps
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(1)

    class GaussianBlur:  # the reference's PIL blur (FRA_SPEC §8)
        def __init__(self, sigma=(0.1, 2.0)):
            self.sigma = sigma

        def __call__(self, x):
            return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))

    class Solarize:
        def __call__(self, x):
            return ImageOps.solarize(x)

    def view(blur_p, sol_p):
        return T.Compose([
            T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
            T.RandomApply([GaussianBlur()], p=blur_p), T.RandomApply([Solarize()], p=sol_p), T.ToTensor(),
            T.Normalize((0.5231, 0.4044, 0.3489), (0.2536, 0.2194, 0.2070)),
        ])

    class TwoCrops:
        def __init__(self):
            self.t1, self.t2 = view(1.0, 0.0), view(0.1, 0.2)

        def __call__(self, x):
            return [self.t1(x), self.t2(x)]

    ds = ImageFolder(str(Path(args.data) / "folder" / "train"), transform=TwoCrops())
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=args.cpus,
                                         persistent_workers=True, drop_last=False)
    return _epochs(loader, lambda b: len(b[1]), len(ds))


def phase_fra_ray(jpegs, size, args) -> dict:
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, object_store_memory=512 << 20,
             log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from fra.data.stream import iter_batches, pretrain_dataset

    ds = pretrain_dataset(str(Path(args.data) / "shards"), image_size=size, batch_size=32)
    out = _epochs(ds, lambda b: len(b["label"]), len(jpegs), iterate=lambda d, e: iter_batches(d, 64, epoch=e, drop_last=False))
    ray.shutdown()
    return out


def _epochs(loader, count, expected, iterate=None) -> dict:
    """Run a warm-up epoch, then time one epoch over the whole process tree."""
    iterate = iterate or (lambda d, e: iter(d))
    n = sum(count(b) for b in iterate(loader, 0))
    assert n == expected, (n, expected)
    idle0 = tree_cpu()
    time.sleep(IDLE_SECONDS)  # background CPU of the idle pipeline (Ray daemons, idle workers)
    idle_rate = (tree_cpu() - idle0) / IDLE_SECONDS
    trials = []
    for epoch in range(1, TRIALS + 1):
        s0, t0 = tree_cpu_split(), time.perf_counter()
        n = sum(count(b) for b in iterate(loader, epoch))
        wall, s1 = time.perf_counter() - t0, tree_cpu_split()
        split = {k: round(s1[k] - s0[k], 2) for k in s0}
        cpu = sum(split.values())
        out = _rates(n, cpu, wall)
        out.update(cpu_split_s=split, idle_cpu_per_s=round(idle_rate, 3),
                   img_per_cpu_s_net_idle=round(n / max(cpu - idle_rate * wall, 1e-9), 1))
        trials.append(out)
    return _best(trials)


def phase_rss(jpegs, size, args) -> dict:
    """Stream ``--manifest`` once; sample memory every 0.5 s. Shared-memory pages of Ray's object
    store (capped at 512 MiB here) show up in RSS/PSS as they get touched; the private memory of
    the driver and of the whole tree is what would reveal a leak."""
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, object_store_memory=512 << 20,
             log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from fra.data.stream import iter_batches, pretrain_dataset

    samples: list[dict] = []
    seen = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            st = _status_kib(os.getpid())
            tree = [_rollup_kib(p) for p in _tree(os.getpid())]
            samples.append({"rows": seen[0], "driver_rss": st.get("VmRSS", 0), "driver_anon": st.get("RssAnon", 0),
                            "tree_pss": sum(t["pss"] for t in tree), "tree_private": sum(t["private"] for t in tree)})
            stop.wait(0.5)

    ds = pretrain_dataset(args.manifest, image_size=size)
    thread = threading.Thread(target=sample, daemon=True)
    c0, t0 = tree_cpu(), time.perf_counter()
    thread.start()
    for b in iter_batches(ds, 64, epoch=0, drop_last=False):
        seen[0] += len(b["label"])
    stop.set()
    thread.join()
    out = _rates(seen[0], tree_cpu() - c0, time.perf_counter() - t0)
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    keys = ("driver_rss", "driver_anon", "tree_pss", "tree_private")
    out["peak_mib"] = {k: mib(max(x[k] for x in samples)) for k in keys}
    window = 10000  # peak per 10k rows streamed: flat if nothing accumulates
    out["peak_mib_per_10k_rows"] = {
        f"{w * window}-{(w + 1) * window}": {k: mib(max(x[k] for x in group)) for k in keys}
        for w in range(seen[0] // window + 1)
        if (group := [x for x in samples if w * window <= x["rows"] < (w + 1) * window])
    }
    ray.shutdown()
    return out


def _best(trials: list[dict]) -> dict:
    """The best trial (highest images per CPU-second), with the spread of all trials."""
    best = dict(max(trials, key=lambda t: t["img_per_cpu_s"]))
    best["trials_img_per_cpu_s"] = [t["img_per_cpu_s"] for t in trials]
    best["loadavg"] = round(os.getloadavg()[0], 1)
    return best


def _rates(n: int, cpu: float, wall: float) -> dict:
    return {"images": n, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "img_per_cpu_s": round(n / cpu, 1), "img_per_wall_s": round(n / wall, 1)}


PHASES = {"floor": phase_floor, "floor_fast": phase_floor_fast, "fra_local": phase_fra_local, "reference": phase_reference, "fra_ray": phase_fra_ray,
          "rss": phase_rss}


# ---- orchestration -------------------------------------------------------------------------
def run_phase(name: str, size: int, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--size", str(size), "--data", args.data, "--images",
           str(args.images), "--cpus", str(args.cpus)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise RuntimeError(f"phase {name} failed:\n{res.stderr[-3000:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  {name:10s} {size:4d}px  {result}", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1500, help="distinct JPEGs for the throughput runs")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 112])
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs / DataLoader workers")
    p.add_argument("--rss-rows", type=int, nargs="*", default=[10000, 20000, 50000])
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of all throughput phases")
    p.add_argument("--rss-size", type=int, default=112)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "data_path.json"))
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        local = ("floor", "floor_fast", "fra_local")
        jpegs = make_jpegs(args.images) if args.phase in local else [None] * args.images
        print(json.dumps(PHASES[args.phase](jpegs, args.size, args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="fra_bench_") as tmp:
        args.data = tmp
        jpegs = make_jpegs(args.images)
        print(f"{len(jpegs)} JPEGs, mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.1f} KiB", flush=True)
        write_image_folder(jpegs, Path(tmp) / "folder")
        from fra.data.shards import write_shards

        write_shards("image_folder", str(Path(tmp) / "folder"), str(Path(tmp) / "shards"), images_per_shard=250,
                     row_group_size=125, parallel=False, shuffle=True)
        results: dict = {"cpus": args.cpus, "images": len(jpegs), "nproc": os.cpu_count(),
                         "loadavg_start": os.getloadavg(), "throughput": {}, "rss": {}}
        # Phases alternate over rounds (the load of other jobs drifts); each keeps its best round.
        for round_ in range(args.rounds):
            for size in args.sizes:
                t = results["throughput"].setdefault(size, {})
                runs = [(f"{n}_x{args.cpus}" if p > 1 else n, n, {"procs": p})
                        for n in ("floor", "fra_local") for p in (1, args.cpus)]
                runs += [("floor_fast", "floor_fast", {"procs": 1}), ("reference", "reference", {}),
                         ("fra_ray", "fra_ray", {})]
                for key, name, extra in runs if round_ % 2 == 0 else runs[::-1]:
                    res = run_phase(name, size, args, **extra)
                    if key not in t or res["img_per_cpu_s"] > t[key]["img_per_cpu_s"]:
                        t[key] = res
        if args.rss_rows:
            uris = write_repeated_shards(jpegs, Path(tmp) / "rss", args.rss_rows)
            for rows in args.rss_rows:
                results["rss"][rows] = run_phase("rss", args.rss_size, args, manifest=uris[rows])
        results["loadavg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


def table(r: dict) -> str:
    n = r["cpus"]
    lines = [f"| size | (a) fra Ray Data | (b) reference DataLoader | (a)/(b) | (a0) fra transform, 1 / {n} procs "
             f"| (c) floor, 1 / {n} procs | (a)/(c) vs 1 / {n} procs | (c') OpenCV-resize floor, 1 proc | (a)/(c') |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, t in r["throughput"].items():
        a, b = t["fra_ray"], t["reference"]
        a0, a0n = t["fra_local"]["img_per_cpu_s"], t[f"fra_local_x{n}"]["img_per_cpu_s"]
        c, cn = t["floor"]["img_per_cpu_s"], t[f"floor_x{n}"]["img_per_cpu_s"]
        cf = t["floor_fast"]["img_per_cpu_s"] if "floor_fast" in t else float("nan")
        ra = a["img_per_cpu_s"]
        lines.append(
            f"| {size} | {ra:.0f} ({a['img_per_cpu_s_net_idle']:.0f} net of idle; {a['img_per_wall_s']:.0f} wall) "
            f"| {b['img_per_cpu_s']:.0f} ({b['img_per_wall_s']:.0f} wall) | {ra / b['img_per_cpu_s']:.2f}x "
            f"| {a0:.0f} / {a0n:.0f} | {c:.0f} / {cn:.0f} | {ra / c:.0%} / {ra / cn:.0%} "
            f"| {cf:.0f} | {ra / cf:.0%} |")
    if r["rss"]:
        lines += ["", "| dataset rows | rows streamed so far | driver RSS | driver private (anon) | tree PSS "
                  "| tree private | (peak MiB) |", "|---|---|---|---|---|---|---|"]
        for rows, m in r["rss"].items():
            for window, p in [("whole run", m["peak_mib"]), *m["peak_mib_per_10k_rows"].items()]:
                lines.append(f"| {rows} | {window} | {p['driver_rss']} | {p['driver_anon']} | {p['tree_pss']} "
                             f"| {p['tree_private']} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
