"""FER fine-tuning at RAF-DB's size: fra's Ray Train job vs the reference's own ``main_fer.py``.

A synthetic RAF-DB (the official layout: ``Image/aligned/*_aligned.jpg`` + ``EmoLabel/
list_patition_label.txt``; 12,271 train / 3,068 test faces, 100 px JPEGs like RAF-DB's aligned
crops, resized to 224 px by both systems) is written once. Then, one after the other in one run
(the reference's runs first: they start no Ray, so they do not hold ``--lock``), per architecture:

* **reference**: the reference's unmodified ``main_fer.py`` (``--reference DIR``, a local checkout
  of zaczgao/Facial_Region_Awareness; nothing of it is copied here) in a subprocess, with its
  own RAFDB dataset, transforms, ``DataLoader(num_workers=cores)``, model and AdamW fine-tune
  step. Only what a CPU-only machine needs is changed from outside: ``.cuda()`` is a no-op, the
  framework helpers it imports and never uses on one process (``classy_vision``'s
  ``is_distributed_training_run``, timm's layers for its FaRL model, tqdm; fvcore's
  ``c2_xavier_fill`` from its own ``utils/init.py``, its ``models/transformers`` bound to the
  name ``transformers`` as in ``benchmarks/train_step.py``) are stubbed when missing, and
  ``init_distributed_mode`` (which exits without a GPU) is not called.
* **fra-ray**: ``fra.evaluation.fer.evaluate_fer`` on the shards of the same images, as ``fra
  evaluate fer`` runs it: one Ray Train worker with ``cpus_per_worker = cores`` (torch uses that
  many threads) and the Ray Data decode/augment tasks beside it, on a local Ray with ``cores + 2``
  logical CPUs (both systems thus run a 2-thread trainer beside 2 decoding processes).
* **fra-local** (optional): the same with ``scaling.num_workers: 0`` (the loop in the driver).

What is measured: both systems are timed at the same point, the call that sets the learning rate
at the start of every training iteration (the reference's ``adjust_learning_rate``, fra's
``fra.evaluation.worker.set_lr``), i.e. after the batch arrived. After ``--warmup-steps``
iterations, ``--steps`` iterations of ``--batch-size`` images are timed; throughput = steps x
batch / (time between the timestamps of iterations W and W + steps). Data waits are included, so
this is the steady-state rate the trainer sees inside an epoch. Set-up before the first step (Ray
start-up, Ray Train's worker, the first Ray Data execution; the reference's worker start-up) is
reported separately as ``first_step_s`` (seconds from the call to the first iteration). The
runs stop after the timed steps (the reference by an exception from the timing hook, fra by a
truncated epoch with a one-batch evaluation), so no number here is an accuracy.

    python benchmarks/fer_scale.py --data /tmp/rafdb_synth --prepare-only   # images + shards, no Ray
    python benchmarks/fer_scale.py --data /tmp/rafdb_synth --reference /path/to/Facial_Region_Awareness \\
        --lock /tmp/fra-ray.lock --epoch-starts 3 --out benchmarks/fer_scale.json
    python benchmarks/fer_scale.py --reference DIR --smoke-test    # tiny, checks that everything runs
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

RAFDB_TRAIN, RAFDB_TEST = 12271, 3068


# ---- data ------------------------------------------------------------------------------------
def write_rafdb(root: str, n_train: int, n_test: int, src_size: int, unique: int) -> None:
    """Synthetic faces in RAF-DB's layout; ``unique`` rendered faces are cycled (the decode cost
    of a JPEG does not depend on whether its pixels occur twice)."""
    from fra.data.decode import encode_jpeg
    from fra.data.synthetic import SyntheticFaces

    spec = SyntheticFaces(num_identities=max(1, -(-unique // 10)), images_per_identity=10, size=src_size,
                          split_fractions=(1.0, 0.0, 0.0), align=True)
    pool = [(encode_jpeg(s["image"], quality=90), s["label"]) for s in itertools.islice(spec.iter_split("train"),
                                                                                            unique)]
    os.makedirs(f"{root}/Image/aligned", exist_ok=True)
    os.makedirs(f"{root}/EmoLabel", exist_ok=True)
    lines, k = [], 0
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k += 1
            jpeg, label = pool[k % len(pool)]
            name = f"{split}_{i + 1:05d}"
            with open(f"{root}/Image/aligned/{name}_aligned.jpg", "wb") as fh:
                fh.write(jpeg)
            lines.append(f"{name}.jpg {label + 1}")
    with open(f"{root}/EmoLabel/list_patition_label.txt", "w") as fh:
        fh.write("\n".join(lines) + "\n")


# ---- reference: main_fer.py, run in a child process ------------------------------------------
class _Stop(Exception):
    pass


def reference_child(spec_path: str) -> int:
    """Runs the reference's ``main_fer.main`` with the timing hook (see the module docstring)."""
    import importlib.machinery
    import types

    import torch

    spec = json.load(open(spec_path))
    for name, attrs in (("classy_vision", {}), ("classy_vision.generic", {}),
                        ("classy_vision.generic.distributed_util", {"is_distributed_training_run": lambda: False}),
                        ("timm", {}), ("timm.models", {}),
                        ("timm.models.layers", {"trunc_normal_": lambda *a, **k: None, "DropPath": torch.nn.Identity}),
                        ("tqdm", {"tqdm": lambda x=None, *a, **k: x})):
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch looks some of them up
            mod.__dict__.update(attrs)
            sys.modules[name] = mod
    torch.nn.Module.cuda = lambda self, *a, **k: self  # CPU-only machine
    torch.Tensor.cuda = lambda self, *a, **k: self
    sys.path.insert(0, spec["reference"])
    # its FRA/LEWEL models (imported by main_fer, unused for FER) need fvcore's c2_xavier_fill, of
    # which it ships its own copy, and its models/transformers package under the name transformers
    import importlib.util

    import utils.init as ref_init

    for name in ("fvcore", "fvcore.nn"):
        sys.modules.setdefault(name, types.ModuleType(name))
    weight_init = types.ModuleType("fvcore.nn.weight_init")
    weight_init.c2_xavier_fill = ref_init.c2_xavier_fill
    sys.modules[weight_init.__name__] = weight_init
    tdir = os.path.join(spec["reference"], "models", "transformers")
    tspec = importlib.util.spec_from_file_location("transformers", os.path.join(tdir, "__init__.py"),
                                                   submodule_search_locations=[tdir])
    pkg = importlib.util.module_from_spec(tspec)
    sys.modules["transformers"] = pkg
    tspec.loader.exec_module(pkg)
    sys.argv = [os.path.join(spec["reference"], "main_fer.py")] + spec["argv"]
    import main_fer  # noqa: E402  (the reference's module, from the local checkout)

    opt = main_fer.parser.parse_args(spec["argv"])
    opt.gpu, opt.rank, opt.world_size = None, 0, 1
    times: list[float] = []
    adjust = main_fer.adjust_learning_rate

    def timed(optimizer, epoch, args):
        times.append(time.perf_counter())
        if len(times) > spec["stop_after"]:
            raise _Stop
        return adjust(optimizer, epoch, args)

    main_fer.adjust_learning_rate = timed
    t0 = time.perf_counter()
    try:
        main_fer.main(opt)
    except _Stop:
        pass
    with open(spec["out"], "w") as fh:
        json.dump({"t0": t0, "times": times, "threads": torch.get_num_threads()}, fh)
    return 0


def reference_run(args, arch: str, root: str, tmp: str) -> dict:
    spec = {"reference": os.path.abspath(args.reference), "stop_after": args.warmup_steps + args.steps,
            "out": f"{tmp}/ref_{arch}.json",
            "argv": ["-a", arch, "--dataset", "rafdb", "--data-root", root, "--lr", "0.0002", "--lr_head", "0.0002",
                     "--optimizer", "adamw", "--weight-decay", "0.05", "--scheduler", "cos", "--finetune",
                     "--epochs", "100", "--batch-size", str(args.batch_size), "--workers", str(args.cores),
                     "--eval-freq", "5", "--image_size", str(args.size), "--data_norm", "vggface2",
                     "--print-freq", "100000", "--save-dir", f"{tmp}/ref_ckpt"]}
    with open(f"{tmp}/ref_spec_{arch}.json", "w") as fh:
        json.dump(spec, fh)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    with open(f"{tmp}/ref_{arch}.log", "w") as log:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--reference-child", f"{tmp}/ref_spec_{arch}.json"],
                       check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    wall = time.perf_counter() - t0
    rec = json.load(open(spec["out"]))
    return _rates(rec["times"], rec["times"][0] - rec["t0"], args) | {"wall_s": wall, "torch_threads": rec["threads"]}


# ---- fra: the Ray Train FER job ---------------------------------------------------------------
def fra_run(args, arch: str, shards: str, tmp: str, workers: int) -> dict:
    import fra.evaluation.worker as worker
    from fra.config import load_config
    from fra.evaluation.fer import FERConfig, evaluate_fer

    out = f"{tmp}/fra_{arch}_{workers}.json"
    limits = {"train": args.warmup_steps + args.steps + 1, "eval": 1, "out": out}
    original = worker.fer_train_loop

    def timed_loop(config: dict, *, _limits=limits, _loop=original):
        """Ray Train worker: fra's loop with timestamps at set_lr and a truncated epoch."""
        import itertools as it
        import json as js
        import time as tm

        import torch as th

        import fra.evaluation.worker as w

        times: list[float] = []
        set_lr, train_epoch, evaluate = w.set_lr, w.train_epoch, w.evaluate

        def timed_set_lr(optimizer, step, spec):
            times.append(tm.perf_counter())
            return set_lr(optimizer, step, spec)

        w.set_lr = timed_set_lr
        w.train_epoch = lambda model, batches, *a, **k: train_epoch(model, it.islice(batches, _limits["train"]),
                                                                     *a, **k)
        w.evaluate = lambda model, batches, *a, **k: evaluate(model, it.islice(batches, _limits["eval"]), *a, **k)
        t0 = tm.perf_counter()
        try:
            return _loop(config)
        finally:
            w.set_lr, w.train_epoch, w.evaluate = set_lr, train_epoch, evaluate
            with open(_limits["out"], "w") as fh:
                js.dump({"t0": t0, "times": times, "threads": th.get_num_threads()}, fh)

    cfg = load_config(FERConfig, data={
        "protocol": "finetune", "data": {"shards": shards, "image_size": args.size, "normalization": "vggface2"},
        "optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": args.batch_size},
        "scaling": {"num_workers": workers, "cpus_per_worker": args.cores},
        "backbone": {"source": f"random:{arch}"}, "tracking": {"enabled": False},
        "run": {"storage_path": f"{tmp}/runs", "save_model": False}})
    worker.fer_train_loop = timed_loop  # fra.evaluation.fer._fit imports it at call time
    t0 = time.perf_counter()
    try:
        evaluate_fer(cfg)
    finally:
        worker.fer_train_loop = original
    wall = time.perf_counter() - t0
    rec = json.load(open(out))
    # first_step_s: from the evaluate_fer call (driver clock) to the first iteration (worker clock;
    # same machine, so the same perf_counter)
    return _rates(rec["times"], rec["times"][0] - t0, args) | {"wall_s": wall, "torch_threads": rec["threads"]}


def epoch_starts(args, shards: str) -> dict:
    """The trainer's wait at each epoch start: seconds from asking for an epoch's batches to its
    first batch, over ``--epoch-starts`` epochs of an augmented stream of the test split's 3,068
    rows (the train split's epochs are 4x longer; the start-up does not depend on the length),
    with a ``--eval-gap`` pause after every epoch standing for the evaluation. Per-epoch streams
    (fra before issue 16 §3) and :class:`fra.evaluation.worker.NextEpochPrefetch` (now)."""
    from fra.data.stream import fer_dataset, iter_batches
    from fra.evaluation.worker import NextEpochPrefetch

    ds = fer_dataset(shards, args.size, "test", train=True)
    make = lambda epoch: iter_batches(ds, args.batch_size, epoch=epoch, drop_last=False)  # noqa: E731
    out = {}
    for mode, batches in (("per_epoch", make), ("next_epoch_prefetch", NextEpochPrefetch(make, args.epoch_starts))):
        waits, epoch_s = [], []
        for epoch in range(args.epoch_starts):
            t0 = time.perf_counter()
            it = iter(batches(epoch))
            next(it)
            waits.append(time.perf_counter() - t0)
            sum(1 for _ in it)
            epoch_s.append(time.perf_counter() - t0)
            time.sleep(args.eval_gap)
        out[mode] = {"first_batch_wait_s": waits, "epoch_s": epoch_s}
        print(f"epoch starts, {mode}: first-batch wait {[round(w, 2) for w in waits]} s, "
              f"epoch {[round(e, 1) for e in epoch_s]} s", flush=True)
    return out


def _rates(times: list[float], first_step_s: float, args) -> dict:
    w, n = args.warmup_steps, args.steps
    if len(times) < w + n + 1:
        raise RuntimeError(f"only {len(times)} iterations were timed (need {w + n + 1}): dataset too small?")
    steps = np.diff(times[w:w + n + 1])
    return {"images_per_s": n * args.batch_size / float(times[w + n] - times[w]),
            "step_s": steps.tolist(), "step_s_median": float(np.median(steps)), "first_step_s": first_step_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", default=os.environ.get("FRA_REFERENCE_DIR", ""),
                   help="local checkout of zaczgao/Facial_Region_Awareness (default: $FRA_REFERENCE_DIR)")
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--systems", default="reference,fra-ray", help="reference, fra-ray, fra-local")
    p.add_argument("--train", type=int, default=RAFDB_TRAIN)
    p.add_argument("--test", type=int, default=RAFDB_TEST)
    p.add_argument("--src-size", type=int, default=100, help="stored JPEG side (RAF-DB aligned: 100)")
    p.add_argument("--size", type=int, default=224, help="model input side")
    p.add_argument("--unique", type=int, default=2000, help="distinct rendered faces, cycled over the files")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--out", default="", help="write the numbers as JSON here")
    p.add_argument("--epoch-starts", type=int, default=0, help="also time N epoch starts (epoch_starts())")
    p.add_argument("--eval-gap", type=float, default=5.0, help="seconds between epochs in the epoch-start probe")
    p.add_argument("--lock", default="", help="hold this file's flock while Ray runs (the reference starts no Ray)")
    p.add_argument("--data", default="", help="keep the images and shards here (reused when present)")
    p.add_argument("--prepare-only", action="store_true", help="write the data (no Ray) and stop")
    p.add_argument("--smoke-test", action="store_true")
    p.add_argument("--reference-child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reference_child:
        return reference_child(args.reference_child)
    if args.smoke_test:
        args.train, args.test, args.size, args.unique, args.batch_size = 96, 16, 32, 40, 8
        args.warmup_steps, args.steps, args.archs = 1, 2, "resnet18"
    systems = [s for s in args.systems.split(",") if s]
    if "reference" in systems and not args.prepare_only and not os.path.isfile(
            os.path.join(args.reference, "main_fer.py")):
        p.error("--reference must point at a checkout of the reference code (main_fer.py), or drop it from --systems")
    import ray
    import torch

    from fra.data.shards import write_shards

    from fra.data.manifest import read_manifest

    tmp = tempfile.mkdtemp(prefix="fer_scale_")
    data = args.data or tmp
    t0 = time.perf_counter()
    if not os.path.isfile(f"{data}/shards/manifest.json"):
        write_rafdb(f"{data}/rafdb", args.train, args.test, args.src_size, args.unique)
        write_shards("rafdb", f"{data}/rafdb", f"{data}/shards", parallel=False)
    manifest = read_manifest(f"{data}/shards")
    rows = {split: manifest.num_rows(split) for split in ("train", "test")}
    if rows != {"train": args.train, "test": args.test}:
        raise SystemExit(f"{data} holds {rows}, not {args.train} / {args.test} rows")
    print(f"data: {rows} in {time.perf_counter() - t0:.0f} s ({data})", flush=True)
    if args.prepare_only:
        return 0
    results = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "reference_child")},
               "rows": rows, "load_avg_start": os.getloadavg(), "runs": {}}
    archs = args.archs.split(",")

    def record(arch: str, system: str, run) -> None:
        load0, start = os.getloadavg()[0], time.strftime("%H:%M:%S")
        r = run()
        r.update(load_avg=[load0, os.getloadavg()[0]], started=start,
                 per_core_images_per_s=r["images_per_s"] / args.cores)
        results["runs"][f"{arch}/{system}"] = r
        print(f"{arch:>9} {system:>10}: {r['images_per_s']:6.2f} img/s ({r['per_core_images_per_s']:.2f} per "
              f"core), step median {r['step_s_median']:.2f} s, first step after {r['first_step_s']:.1f} s, "
              f"{r['torch_threads']} threads, load {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f}", flush=True)

    # The reference starts no Ray: its runs come first, outside --lock; fra's runs hold the lock.
    for arch in archs:
        if "reference" in systems:
            record(arch, "reference", lambda: reference_run(args, arch, f"{data}/rafdb", tmp))
    fra_systems = [s for s in systems if s != "reference"]
    if fra_systems or args.epoch_starts:
        import fcntl

        from fra.ray_runtime import init_ray

        lock = open(args.lock, "a") if args.lock else None
        t0 = time.perf_counter()
        if lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
        results["lock_wait_s"] = time.perf_counter() - t0
        try:
            # fra's own local start-up (its Parquet block size, the dashboard), with cores + 2 logical CPUs
            init_ray(num_cpus=args.cores + 2, log_to_driver=False, configure_logging=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            torch.set_num_threads(args.cores)
            for arch in archs:
                for system in fra_systems:
                    record(arch, system, lambda: fra_run(args, arch, f"{data}/shards", tmp,
                                                         0 if system == "fra-local" else 1))
            if args.epoch_starts:
                results["epoch_starts"] = epoch_starts(args, f"{data}/shards")
            ray.shutdown()
        finally:
            if lock:
                lock.close()
    for arch in archs:
        ref = results["runs"].get(f"{arch}/reference")
        for system in fra_systems:
            if ref:
                ratio = results["runs"][f"{arch}/{system}"]["images_per_s"] / ref["images_per_s"]
                results.setdefault("ratio_vs_reference", {})[f"{arch}/{system}"] = ratio
                print(f"{arch:>9} {system:>10}: {ratio:.2f}x the reference", flush=True)
    results["load_avg_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
