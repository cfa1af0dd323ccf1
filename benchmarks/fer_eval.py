"""FER evaluation throughput: fra (Ray Data + Ray Train) vs the reference protocol's plain PyTorch loop.

Same shards (synthetic faces, JPEG in Parquet), same model (torchvision ResNet), same image size,
batch, epochs and cores. The reference loop is ``main_fer.py`` restated (FRA_SPEC §9): a map-style
Dataset decoding JPEG bytes with PIL, torchvision v1 transforms (Resize, HFlip, ColorJitter
p=0.5, RandomAffine translate p=0.5, RandomRotation p=0.5, ToTensor, Normalize,
RandomErasing), ``DataLoader(num_workers=cores)``, CrossEntropy, AdamW (fine-tune) or SGD
(linear, frozen backbone in eval mode), per-iteration warm-up + cosine, evaluation every epoch.

Reported per system and protocol: training images/s (images / time in the training loops, data
waits included), seconds per epoch including evaluation, and end-to-end wall time.

    python benchmarks/fer_eval.py                # 1024 train / 256 test at 112 px, ResNet-18, 3 epochs
    python benchmarks/fer_eval.py --smoke-test   # seconds; checks that everything runs
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

VGG = ((0.5231, 0.4044, 0.3489), (0.2536, 0.2194, 0.2070))


def reference_loop(rows, test_rows, args, protocol: str) -> dict:
    """The reference protocol as a plain PyTorch program (no fra code in the data path)."""
    import torchvision.transforms as T
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision.models import get_model

    from fra.optim.schedules import warmup_cosine_lr

    s = args.size
    train_tf = T.Compose([T.Resize((s, s)), T.RandomHorizontalFlip(),
                          T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5)], p=0.5),
                          T.RandomApply([T.RandomAffine(0, translate=(0.2, 0.2))], p=0.5),
                          T.RandomApply([T.RandomRotation(10)], p=0.5), T.ToTensor(), T.Normalize(*VGG),
                          T.RandomErasing()])
    test_tf = T.Compose([T.Resize((s, s)), T.ToTensor(), T.Normalize(*VGG)])

    class Bytes(Dataset):
        def __init__(self, items, tf):
            self.items, self.tf = items, tf

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            raw, label = self.items[i]
            return self.tf(Image.open(io.BytesIO(raw)).convert("RGB")), label

    kw = {"num_workers": args.cores, "persistent_workers": args.cores > 0}
    train = DataLoader(Bytes(rows, train_tf), batch_size=args.batch_size, shuffle=True, drop_last=False, **kw)
    test = DataLoader(Bytes(test_rows, test_tf), batch_size=args.batch_size, **kw)
    torch.manual_seed(0)
    model = get_model(args.arch, num_classes=7)
    if protocol == "linear":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("fc."))
        opt = torch.optim.SGD(model.fc.parameters(), lr=args.linear_lr, momentum=0.9, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.05)
    crit, iters, step, train_s, images, epochs = nn.CrossEntropyLoss(), len(train), 0, 0.0, 0, []
    t_start = time.perf_counter()
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train(protocol == "finetune")
        for x, y in train:
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(step, iters, g.get("initial_lr", g.setdefault("initial_lr", g["lr"])),
                                           args.epochs, args.warmup, 1e-6)
            loss = crit(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step, images = step + 1, images + len(y)
        t1 = time.perf_counter()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test:
                correct += int((model(x).argmax(1) == y).sum())
        train_s += t1 - t0
        epochs.append({"epoch": epoch + 1, "train_s": t1 - t0, "eval_s": time.perf_counter() - t1,
                       "top1": 100.0 * correct / len(test_rows)})
    return {"train_images_per_s": images / train_s, "epoch_s": [e["train_s"] + e["eval_s"] for e in epochs],
            "wall_s": time.perf_counter() - t_start, "top1_last": epochs[-1]["top1"]}


def fra_run(shards: str, storage: str, args, protocol: str, workers: int) -> dict:
    from fra.config import load_config
    from fra.evaluation.fer import FERConfig, evaluate_fer

    cfg = load_config(FERConfig, data={
        "protocol": protocol, "data": {"shards": shards, "image_size": args.size, "normalization": "vggface2"},
        "optim": {"epochs": args.epochs, "warmup_epochs": args.warmup, "batch_size": args.batch_size,
                  **({"lr": args.linear_lr} if protocol == "linear" else {})},
        "scaling": {"num_workers": workers, "cpus_per_worker": args.cores},
        "backbone": {"source": f"random:{args.arch}"}, "tracking": {"enabled": False},
        "run": {"storage_path": storage, "save_model": False}})
    t0 = time.perf_counter()
    res = evaluate_fer(cfg)
    wall = time.perf_counter() - t0
    h = res.history
    return {"train_images_per_s": sum(e["images"] for e in h) / sum(e["images"] / e["train_images_per_s"] for e in h),
            "epoch_s": [e["images"] / e["train_images_per_s"] + e.get("eval_seconds", 0.0) for e in h],
            "wall_s": wall, "top1_last": res.top1_last}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--identities", type=int, default=128, help="synthetic identities (x10 images, 80/20 split)")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--linear-lr", type=float, default=1.0)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--systems", default="reference,fra-local,fra-ray")
    p.add_argument("--protocols", default="finetune,linear")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions of every system")
    p.add_argument("--out", default="", help="write the numbers as JSON here")
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.identities, args.size, args.epochs, args.batch_size = 8, 32, 1, 16
    os.environ.setdefault("RAY_DATA_PARQUET_BIN_PACKING_BYTES", "1048576")
    import pyarrow.parquet as pq
    import ray

    from fra.data.manifest import read_manifest
    from fra.data.shards import write_shards

    ray.init(num_cpus=args.cores + 2, include_dashboard=True, log_to_driver=False,  # State API: Train's PG cleaner
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    torch.set_num_threads(args.cores)
    tmp = tempfile.mkdtemp(prefix="fer_bench_")
    write_shards("synthetic_faces", "", f"{tmp}/shards", parallel=False, num_identities=args.identities,
                 images_per_identity=10, size=args.size)
    manifest = read_manifest(f"{tmp}/shards")
    split_rows = {s: [r for u in manifest.shard_uris(s) for r in zip(*(pq.read_table(u, columns=["image", "label"])
                  .column(c).to_pylist() for c in ("image", "label")))] for s in ("train", "test")}
    results = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "load_avg_start": os.getloadavg(),
               "rows": {s: len(r) for s, r in split_rows.items()}, "runs": {}}
    for rep in range(args.repeats):  # interleaved, so a change in machine load hits every system alike
        for protocol in args.protocols.split(","):
            for system in args.systems.split(","):
                if system == "reference":
                    r = reference_loop(split_rows["train"], split_rows["test"], args, protocol)
                else:
                    r = fra_run(f"{tmp}/shards", f"{tmp}/runs", args, protocol, 0 if system == "fra-local" else 1)
                r["load_avg"] = os.getloadavg()[0]
                results["runs"].setdefault(f"{system}/{protocol}", []).append(r)
                print(f"[{rep}] {system:>10} {protocol:>8}: train {r['train_images_per_s']:7.1f} img/s, epoch "
                      f"{np.median(r['epoch_s']):6.1f} s (median, incl. eval), wall {r['wall_s']:6.1f} s, "
                      f"top-1 {r['top1_last']:.1f}%, load {r['load_avg']:.1f}", flush=True)
    print("\nsystem/protocol        train img/s (median of runs)   s/epoch (median, epochs >= 2)   wall s (median)")
    for key, runs in results["runs"].items():
        steady = [e for r in runs for e in r["epoch_s"][1:]] or [e for r in runs for e in r["epoch_s"]]
        row = {"train_images_per_s": float(np.median([r["train_images_per_s"] for r in runs])),
               "epoch_s": float(np.median(steady)), "wall_s": float(np.median([r["wall_s"] for r in runs]))}
        results.setdefault("summary", {})[key] = row
        print(f"{key:<22} {row['train_images_per_s']:10.1f} {row['epoch_s']:30.1f} {row['wall_s']:28.1f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
