"""What one tiny Ray Train job costs on this machine, by process: the floor under the test suite.

Runs ``--jobs`` tiny pretraining jobs in a row (``fra.train.ray_trainer.pretrain_ray``: ResNet-18 at
64 px, 64 synthetic faces, batch 8, one epoch, one worker) on one local Ray, started as
fra starts one (``fra.ray_runtime.init_ray``, 4 logical CPUs, the dashboard on, as the tests' Ray).
A sampler thread reads ``/proc`` every 0.25 s and keeps, for every process that started after the
script, its CPU time (user + system); at the end each Ray worker process is named after the actor
it hosted (the ``:actor_name:`` line Ray writes at the top of the worker's log file, whose name
ends in the pid) or "task worker" (Ray Data's pooled read/map workers).

Printed and written to ``--out``: each job's wall time; per actor class the number of processes and
their CPU-seconds (all but the training worker's is start-up and bookkeeping, not training); the
driver's CPU; and the cores kept busy on average (all CPU over all wall time of the jobs).

    .venv/bin/python benchmarks/ray_job_overhead.py --jobs 4 --out benchmarks/ray_job_overhead.json

Needs a quiet machine and no other Ray (run it under the Ray lock, like the tests).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

TINY = {
    "model": {"backbone": "resnet18", "hidden_dim": 64, "proj_dim": 32, "num_proto": 4, "decoder_heads": 4,
              "decoder_ffn": 64, "dropout": 0.0},
    "optim": {"lr": 1.0, "epochs": 1, "warmup_epochs": 0, "batch_size": 8},
    "data": {"source": "synthetic", "image_size": 64,
             "synthetic": {"num_identities": 8, "images_per_identity": 8, "size": 64}},
    "scaling": {"num_workers": 1, "max_failures": 0},
    "run": {"log_every": 2, "heatmaps_every_epoch": False},
    "tracking": {"enabled": False},
}
TICK = os.sysconf("SC_CLK_TCK")


class ProcSampler(threading.Thread):
    """CPU-seconds of every process that started after ``since`` (seconds since boot)."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.since = _boot_seconds()
        self.seen: dict[tuple[int, int], dict] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rfind(")") + 2:].split()
                start = int(fields[19]) / TICK
                if start < self.since:
                    continue
                key = (int(entry), int(fields[19]))
                cpu = (int(fields[11]) + int(fields[12])) / TICK
                if key not in self.seen:
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    self.seen[key] = {"pid": int(entry), "cmd": cmd[:200], "cpu_s": cpu}
                self.seen[key]["cpu_s"] = max(self.seen[key]["cpu_s"], cpu)
            except (OSError, IndexError, ValueError):
                continue  # the process ended between listdir and read


def _boot_seconds() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def actor_names(logs_dir: Path) -> dict[int, str]:
    """pid -> actor class, from the worker log files of a Ray session."""
    out = {}
    for f in logs_dir.glob("worker-*.out"):
        pid = int(f.stem.rsplit("-", 1)[-1])
        m = re.search(r":actor_name:(\w+)", f.read_text(errors="replace")[:4000])
        if m:
            out[pid] = m.group(1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    sampler = ProcSampler()
    sampler.start()
    import ray
    import yaml

    from fra.cli.pretrain import load_pretrain_config
    from fra.ray_runtime import init_ray
    from fra.train.ray_trainer import pretrain_ray

    driver_cpu0 = time.process_time()
    t0 = time.time()
    init_ray(num_cpus=4, dashboard=True, log_to_driver=False)
    ray_up = time.time() - t0
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    jobs = []
    with tempfile.TemporaryDirectory(prefix="fra-job-overhead-") as tmp:
        path = Path(tmp) / "tiny.yaml"
        path.write_text(yaml.safe_dump(TINY))
        first_job = time.time()
        for i in range(args.jobs):
            cfg = load_pretrain_config(str(path), [f"run.storage_path={tmp}"], f"job{i}")
            t = time.time()
            out = pretrain_ray(cfg)
            jobs.append({"wall_s": round(time.time() - t, 2), "steps": out.return_value["step"]})
            print(f"job {i}: {jobs[-1]['wall_s']:.1f} s, {jobs[-1]['steps']} steps", flush=True)
        jobs_wall = time.time() - first_job
        names = actor_names(logs)
        driver_cpu = time.process_time() - driver_cpu0
        ray.shutdown()
    sampler.stop.set()
    sampler.join()

    me = os.getpid()
    by_class: dict[str, dict] = defaultdict(lambda: {"processes": 0, "cpu_s": 0.0})
    for proc in sampler.seen.values():
        if proc["pid"] == me:
            continue
        if proc["pid"] in names:
            name = names[proc["pid"]]
        elif "default_worker.py" in proc["cmd"] or "setup_worker.py" in proc["cmd"]:
            name = "task worker"
        else:
            name = "Ray node (GCS, raylet, dashboard, agents)"
        by_class[name]["processes"] += 1
        by_class[name]["cpu_s"] += proc["cpu_s"]
    total_cpu = sum(c["cpu_s"] for c in by_class.values()) + driver_cpu
    result = {
        "command": f"benchmarks/ray_job_overhead.py --jobs {args.jobs}",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cores": os.cpu_count(),
        "ray_start_s": round(ray_up, 2), "jobs": jobs,
        "driver_cpu_s": round(driver_cpu, 2),
        "by_class": {k: {"processes": v["processes"], "cpu_s": round(v["cpu_s"], 2)}
                     for k, v in sorted(by_class.items(), key=lambda kv: -kv[1]["cpu_s"])},
        "all_cpu_s_from_ray_start": round(total_cpu, 2),
        "wall_s_from_ray_start": round(time.time() - t0, 2),
    }
    result["mean_cores_busy"] = round(result["all_cpu_s_from_ray_start"] / result["wall_s_from_ray_start"], 2)
    print(f"Ray up in {ray_up:.1f} s; jobs {jobs_wall:.0f} s in all")
    print(f"{'process (actor class)':45s} {'n':>3s} {'CPU-s':>7s}")
    for k, v in result["by_class"].items():
        print(f"{k:45s} {v['processes']:3d} {v['cpu_s']:7.1f}")
    print(f"{'driver (this process)':45s} {1:3d} {driver_cpu:7.1f}")
    print(f"mean cores busy: {result['mean_cores_busy']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
