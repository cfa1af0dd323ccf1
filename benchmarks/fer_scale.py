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

``--interleave N`` (see :func:`interleave`) runs N (reference, fra-ray) pairs per architecture back to
back and records, per run, the load and the CPU-seconds of every process in the timed window;
``--profile ARCHS`` adds one py-spy-profiled pair (trainer thread split into forward / backward /
optimizer / batch wait; the data processes' busy samples into decode / augment / collate):

    python benchmarks/fer_scale.py --data /tmp/rafdb_synth --reference DIR --lock /tmp/fra-ray.lock \
        --lock-scope arch --archs resnet18 --interleave 3 --profile resnet18 --batch-size 32 \
        --warmup-steps 2 --steps 8 --out benchmarks/fer_scale_interleave.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
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


# ---- profiling: per-process CPU from /proc, py-spy on the trainer ------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, utime + stime ticks, title) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            title = fh.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), title


def _machine_busy_ticks() -> int:
    with open("/proc/stat") as fh:
        cpu = [int(v) for v in fh.readline().split()[1:]]
    return sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait


class CpuSampler:
    """Samples, every ``interval`` s, the CPU ticks of this process's descendants (the
    reference's DataLoader workers; Ray's raylet, GCS, train worker and data-task workers) and of
    the whole machine, so that a window's CPU-seconds can be split per process title."""

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval, self.samples, self._stop = interval, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        root = os.getpid()
        while not self._stop.is_set():
            t = time.perf_counter()
            procs = {}
            for name in os.listdir("/proc"):
                if name.isdigit():
                    st = _proc_stat(int(name))
                    if st:
                        procs[int(name)] = st
            ours, frontier = {root}, [root]
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in procs.items():
                children.setdefault(ppid, []).append(pid)
            while frontier:
                kids = children.get(frontier.pop(), [])
                ours.update(kids)
                frontier.extend(kids)
            self.samples.append((t, _machine_busy_ticks(), {pid: procs[pid][1:] for pid in ours if pid in procs}))
            self._stop.wait(self.interval)

    def window(self, t0: float, t1: float, classify) -> dict:
        """CPU-seconds per class between t0 and t1 (sample intervals overlapping the window; a
        process's ticks go to its title at the interval's end: Ray data workers change title)."""
        out: dict[str, float] = {}
        machine = 0
        pairs = [(a, b) for a, b in zip(self.samples, self.samples[1:]) if b[0] > t0 and a[0] < t1]
        for (_, m0, p0), (_, m1, p1) in pairs:
            machine += m1 - m0
            for pid, (ticks, title) in p1.items():
                d = ticks - p0.get(pid, (ticks if pid in p0 else 0, ""))[0]
                if d > 0:
                    key = classify(pid, title)
                    out[key] = out.get(key, 0.0) + d / _TICK
        span = (pairs[-1][1][0] - pairs[0][0][0]) if pairs else 0.0
        ours = sum(out.values())
        return {"cpu_s": out, "sampled_s": span, "machine_busy_cpu_s": machine / _TICK,
                "others_cpu_s": machine / _TICK - ours}


def classify_fra(pid: int, title: str) -> str:
    if "py-spy" in title:
        return "profiler"
    if pid == os.getpid():
        return "driver"
    if "RayTrainWorker" in title:
        return "trainer"
    if title.startswith("ray::") and any(k in title for k in ("MapBatches", "ReadParquet", "Read", "Map(", "IDLE")):
        return "data_tasks"
    if title.startswith("ray::"):
        return "ray_actors:" + title.split("(")[0].split(".")[0][5:]
    return "ray_system:" + os.path.basename(title.split()[0]) if title else "ray_system:?"


def classify_ref(child_pid: list):
    def classify(pid: int, title: str) -> str:
        if "py-spy" in title:
            return "profiler"
        if pid == os.getpid():
            return "driver"
        return "trainer" if child_pid and pid == child_pid[0] else "dataloader_workers"
    return classify


def pyspy_start(out: str, pid: int | None = None, idle: bool = True, subprocesses: bool = False):
    """py-spy on a process (default: this one; its threads, with ``subprocesses`` its children
    too) at 50 samples/s without pausing it; ``idle``: also the samples of sleeping threads."""
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    cmd = [exe, "record", "--pid", str(pid or os.getpid()), "--threads", "--rate", "50", "--nonblocking",
           "--format", "raw", "-o", out] + (["--idle"] if idle else []) + (["--subprocesses"] if subprocesses else [])
    # a Ray worker ignores SIGINT and an ignored signal survives exec: restore it for py-spy's Ctrl-C
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def pyspy_stop(procs) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def ray_task_pids() -> list[int]:
    """Ray worker processes other than this one (the data tasks' workers, Ray's actors)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            st = _proc_stat(int(name))
            if st and st[2].startswith("ray::") and "RayTrainWorker" not in st[2]:
                out.append(int(name))
    return out


_WAIT_FUNCS = {"wait", "get", "acquire", "select", "poll", "_poll", "recv", "_recv", "recv_bytes", "sleep",
               "accept", "get_objects", "wait_for_objects", "_wait_for_tstate_lock", "join", "epoll"}


def _is_wait(leaf: str) -> bool:
    """A sample whose innermost Python function blocks (``Condition.wait``, ``socket.accept``...)."""
    return leaf.split(" (")[0].split(".")[-1] in _WAIT_FUNCS


def _step_part(frames: list[str]) -> str:
    """One sample of the training thread -> part of the step (frames root first)."""
    text = ";".join(frames)
    if "backward (torch/_tensor.py" in text or "torch/autograd/" in text:
        return "backward"
    if "torch/optim/" in text:
        return "optimizer"
    if ("__next__ (torch/utils/data/dataloader.py" in text or "ray/data/" in text
            or "fra/data/stream.py" in text):
        return "batch_wait" if _is_wait(frames[-1]) else "batch_transfer"
    if "torch/nn/modules/" in text or "forward (" in text:
        return "forward"
    return "other"


def _data_part(frames: list[str]) -> str:
    """One busy sample of a data process/thread -> part of the data path."""
    text = ";".join(frames)
    for part, keys in (("collate", ("torch/utils/data/_utils/collate.py", "_stack_chw", "default_collate")),
                       ("decode", ("_decode (", "imdecode", "PIL/ImageFile.py", "decode (fra/data/decode.py",
                                   "fra/data/decode.py", "pil_loader", "PIL/Image.py:3", "open (PIL")),
                       ("augment", ("torchvision/transforms", "fra/data/augment.py", "transform (")),
                       ("object_store", ("serializ", "ray/_private/worker.py", "put (", "plasma")),
                       ("ray_data_other", ("ray/data/", "ray/_private", "ray/util"))):
        if any(k in text for k in keys):
            return part
    return "other"


def pyspy_summary(paths: list[str], marker: str) -> dict:
    """Seconds (samples / 50) per step part of the training thread (the thread of the sampled
    root process whose stack matches the ``marker`` regex: the training loop's function) and per
    data part of every busy-looking sample of the other threads and child processes (a forked
    DataLoader worker inherits the parent's frames, hence "root process")."""
    marker_re = re.compile(marker)
    parts: dict[str, float] = {}
    data: dict[str, float] = {}
    leaves: dict[str, float] = {}
    found = 0
    for path in paths:
        if not os.path.isfile(path):
            continue
        found += 1
        for line in open(path):
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            frames = [f.strip() for f in stack.split(";")]
            n = int(count) / 50.0
            procs = [f for f in frames if f.startswith("process ")]
            code = [f for f in frames if not f.startswith(("process ", "thread ("))]
            if not code:
                continue
            if len(procs) <= 1 and any(marker_re.search(f) for f in code):
                part = _step_part(code)
                parts[part] = parts.get(part, 0.0) + n
            elif not _is_wait(code[-1]):
                part = _data_part(code)
                data[part] = data.get(part, 0.0) + n
                leaf = code[-1].split(" (")[0]
                leaves[leaf] = leaves.get(leaf, 0.0) + n
    top = dict(sorted(leaves.items(), key=lambda kv: -kv[1])[:10])
    return {"files": found, "train_thread_s": parts, "other_busy_s": data, "other_busy_top_leaves_s": top}


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

    spies = []

    def timed(optimizer, epoch, args):
        times.append(time.perf_counter())
        if spec.get("profile") and len(times) == spec["warmup"] + 1:  # the timed window starts
            spies.append(pyspy_start(spec["profile"] + "_ref.raw", subprocesses=True))
        if len(times) > spec["stop_after"]:
            pyspy_stop(spies)
            raise _Stop
        return adjust(optimizer, epoch, args)

    main_fer.adjust_learning_rate = timed
    t0 = time.perf_counter()
    try:
        main_fer.main(opt)
    except _Stop:
        pass
    with open(spec["out"], "w") as fh:
        json.dump({"t0": t0, "times": times, "threads": torch.get_num_threads(), "env": _thread_env()}, fh)
    return 0


def reference_run(args, arch: str, root: str, tmp: str, profile: str = "", child: list | None = None) -> dict:
    spec = {"reference": os.path.abspath(args.reference), "stop_after": args.warmup_steps + args.steps,
            "out": f"{tmp}/ref_{arch}.json", "warmup": args.warmup_steps, "profile": profile,
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
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--reference-child",
                                 f"{tmp}/ref_spec_{arch}.json"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        if child is not None:
            child[:] = [proc.pid]
        if proc.wait():
            raise subprocess.CalledProcessError(proc.returncode, proc.args)
    wall = time.perf_counter() - t0
    rec = json.load(open(spec["out"]))
    return _rates(rec["times"], rec["times"][0] - rec["t0"], args) | {"wall_s": wall, "torch_threads": rec["threads"],
                                                                       "threads_env": rec.get("env", {})}


# ---- fra: the Ray Train FER job ---------------------------------------------------------------
def _thread_env() -> dict:
    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def fra_run(args, arch: str, shards: str, tmp: str, workers: int, profile: str = "") -> dict:
    import fra.evaluation.worker as worker
    from fra.config import load_config
    from fra.evaluation.fer import FERConfig, evaluate_fer

    out = f"{tmp}/fra_{arch}_{workers}.json"
    limits = {"train": args.warmup_steps + args.steps + 1, "eval": 1, "out": out, "warmup": args.warmup_steps,
              "profile": profile}
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
        spies: list = []

        def timed_set_lr(optimizer, step, spec):
            times.append(tm.perf_counter())
            if _limits["profile"] and len(times) == _limits["warmup"] + 1:  # the timed window starts
                spies.append(pyspy_start(_limits["profile"] + "_trainer.raw"))
                spies.extend(pyspy_start(_limits["profile"] + f"_task{pid}.raw", pid, idle=False)
                             for pid in ray_task_pids())
            if len(times) == _limits["train"]:
                pyspy_stop(spies)
                spies.clear()
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
            pyspy_stop(spies)
            with open(_limits["out"], "w") as fh:
                js.dump({"t0": t0, "times": times, "threads": th.get_num_threads(), "env": _thread_env(),
                         "pid": os.getpid()}, fh)

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
    return _rates(rec["times"], rec["times"][0] - t0, args) | {"wall_s": wall, "torch_threads": rec["threads"],
                                                              "threads_env": rec.get("env", {})}


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
    return {"window": [times[w], times[w + n]], "images_per_s": n * args.batch_size / float(times[w + n] - times[w]),
            "step_s": steps.tolist(), "step_s_median": float(np.median(steps)), "first_step_s": first_step_s}


def interleave(args, data: str, tmp: str, archs: list[str]) -> dict:
    """``--interleave N``: per architecture N pairs (reference, fra-ray) back to back, each run
    with its own load average and the CPU-seconds of every process class in the timed window
    (:class:`CpuSampler`); fra's runs take ``--lock`` one at a time (Ray up and down per run).
    ``--profile``: one more pair per architecture under py-spy (not in the ratios)."""
    import fcntl
    import glob

    import ray
    import torch

    from fra.ray_runtime import init_ray

    images = args.steps * args.batch_size

    def finish(r: dict, cs: CpuSampler, classify, load0: float, start: str) -> dict:
        win = cs.window(*r["window"], classify)
        span = r["window"][1] - r["window"][0]
        r.update(load_avg=[load0, os.getloadavg()[0]], started=start, cpu=win,
                 cpu_s_per_image={k: v / images for k, v in sorted(win["cpu_s"].items())},
                 others_cores=win["others_cpu_s"] / max(win["sampled_s"], 1e-9), window_s=span)
        return r

    def ref_once(arch: str, profile: str = "") -> dict:
        child: list[int] = []
        load0, start = os.getloadavg()[0], time.strftime("%H:%M:%S")
        with CpuSampler() as cs:
            r = reference_run(args, arch, f"{data}/rafdb", tmp, profile, child)
        r = finish(r, cs, classify_ref(child), load0, start)
        if profile:
            r["profile"] = pyspy_summary([profile + "_ref.raw"], r"^train \(.*main_fer")
        return r

    held = {}

    def take_lock() -> float:
        """Blocks on ``--lock`` (unless already held: ``--lock-scope arch``); returns the wait."""
        t0 = time.perf_counter()
        if args.lock and "fh" not in held:
            held["fh"] = open(args.lock, "a")
            fcntl.flock(held["fh"], fcntl.LOCK_EX)
        return time.perf_counter() - t0

    def release_lock() -> None:
        if "fh" in held:
            held.pop("fh").close()

    def fra_once(arch: str, profile: str = "") -> dict:
        wait = take_lock()
        try:
            load0, start = os.getloadavg()[0], time.strftime("%H:%M:%S")
            init_ray(num_cpus=args.cores + 2, log_to_driver=False, configure_logging=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            torch.set_num_threads(args.cores)
            with CpuSampler() as cs:
                r = fra_run(args, arch, f"{data}/shards", tmp, 1, profile)
        finally:
            ray.shutdown()
            if args.lock_scope == "run":
                release_lock()
        r = finish(r, cs, classify_fra, load0, start)
        r["lock_wait_s"] = wait
        if profile:
            r["profile"] = pyspy_summary([profile + "_trainer.raw"], r"^train_epoch \(")
            r["profile"]["data_tasks"] = pyspy_summary(sorted(glob.glob(profile + "_task*.raw")), r"(?!)")
        return r

    def show(arch: str, system: str, r: dict) -> None:
        cpu = ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_s_per_image"].items())
        print(f"{arch:>9} {system:>10}: {r['images_per_s']:6.2f} img/s, steps {[round(x, 1) for x in r['step_s']]}, "
              f"load {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f}, others {r['others_cores']:.2f} cores; "
              f"CPU-s/img: {cpu}", flush=True)

    out = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "reference_child")},
           "mode": "interleave", "pairs": {}, "profiled": {}, "summary": {}}
    only_ref = "fra-ray" not in args.systems.split(",")

    def dump() -> None:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(out, fh, indent=1)

    def profiled_pair(arch: str) -> None:
        prefix = f"{tmp}/spy_{arch}"
        ref = ref_once(arch, prefix)
        show(arch, "reference", ref)
        print(json.dumps(ref["profile"], indent=1), flush=True)
        out["profiled"][arch] = {"reference": ref}
        if not only_ref:
            fra = fra_once(arch, prefix)
            show(arch, "fra-ray", fra)
            print(json.dumps(fra["profile"], indent=1), flush=True)
            out["profiled"][arch].update({"fra-ray": fra, "ratio": fra["images_per_s"] / ref["images_per_s"]})

    for arch in archs:
        if args.lock_scope == "arch" and not only_ref:
            out.setdefault("lock_wait_s", {})[arch] = take_lock()
        if arch in args.profile.split(","):  # first, under the same lock hold as the pairs
            try:
                profiled_pair(arch)
            except Exception as exc:  # the profile is an extra: the timed pairs still run
                out["profiled"][arch] = {"error": repr(exc)}
                print(f"profile of {arch} failed: {exc!r}", flush=True)
            dump()
        pairs = out["pairs"][arch] = []
        for i in range(args.interleave):
            ref = ref_once(arch)
            show(arch, "reference", ref)
            if only_ref:
                pairs.append({"reference": ref})
                continue
            fra = fra_once(arch)
            show(arch, "fra-ray", fra)
            pairs.append({"reference": ref, "fra-ray": fra, "ratio": fra["images_per_s"] / ref["images_per_s"]})
            print(f"{arch:>9} pair {i + 1}: fra-ray / reference = {pairs[-1]['ratio']:.2f}", flush=True)
            dump()
        release_lock()
        if only_ref or not pairs:
            continue
        ratios = [p["ratio"] for p in pairs]
        cpu = {s: [sum(p[s]["cpu_s_per_image"].values()) - p[s]["cpu_s_per_image"].get("driver", 0.0)
                   for p in pairs] for s in ("reference", "fra-ray")}
        out["summary"][arch] = {"ratios": ratios, "median_ratio": float(np.median(ratios)),
                                "min_ratio": min(ratios), "max_ratio": max(ratios),
                                "reference_img_s_median": float(np.median([p["reference"]["images_per_s"] for p in pairs])),
                                "fra_img_s_median": float(np.median([p["fra-ray"]["images_per_s"] for p in pairs])),
                                "cpu_s_per_image_median": {s: float(np.median(v)) for s, v in cpu.items()},
                                "cpu_ratio_median": float(np.median([r / f for r, f in zip(cpu["reference"],
                                                                                           cpu["fra-ray"])]))}
        print(f"{arch:>9}: median ratio {out['summary'][arch]['median_ratio']:.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}); CPU-s/img reference / fra "
              f"{out['summary'][arch]['cpu_ratio_median']:.2f}", flush=True)
        dump()
    return out


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
    p.add_argument("--interleave", type=int, default=0,
                   help="N pairs (reference, fra-ray) per arch, interleaved, each with its load (interleave())")
    p.add_argument("--lock-scope", choices=("run", "arch"), default="run",
                   help="take --lock per fra run, or once per architecture's interleaved pairs "
                        "(Ray still goes down between fra's runs)")
    p.add_argument("--profile", default="", help="archs for one extra py-spy-profiled pair (with --interleave)")
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
    if args.interleave or args.profile:
        interleave(args, data, tmp, archs=args.archs.split(","))
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
