"""Step-time cost of a checkpoint on the cluster-shaped setup: synchronous vs asynchronous upload.

Starts the same cluster as tests/test_cluster_e2e.py (a head with 0 CPUs, a worker node with its
own raylet and private /tmp, S3 from a local moto server through the AWS_* variables, a real
MLflow server) and submits ``fra pretrain pipelines/pretrain_demo.yaml`` twice with
``ray job submit --working-dir .``, checkpoints on S3 every ``--every`` steps, once with
``run.checkpoint_upload=sync`` and once with ``async``; the two jobs run one after the other on
the same cluster (in the order given by --order, default alternating per repeat).

Rank 0 logs every step to MLflow (``run.log_every=1``) with a wall-clock timestamp, so step i's
duration is t_i - t_{i-1}. The checkpoint of step k (k % every == 0) is written by the step hook,
which runs before that step's log line, so it lands in the duration of step k. Reported per mode: the median duration of steps that follow a
checkpoint, of the other steps, and their difference (the checkpoint's cost on the training
loop), plus the checkpoint size.

    .venv/bin/python benchmarks/checkpoint_upload.py --out benchmarks/checkpoint_upload.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def start_s3(port: int) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto did not start")


def step_durations(client, run_id: str) -> dict[int, float]:
    hist = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    return {b.step: (b.timestamp - a.timestamp) / 1000 for a, b in zip(hist, hist[1:]) if b.step == a.step + 1}


def main(argv=None) -> int:
    from mlflow.tracking import MlflowClient

    from fra import storage as st
    from fra.mlflow_server import MlflowServer
    from tests.cluster import RayCluster, free_port, job_workdir, private_tmp_supported

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=7, help="checkpoint every N steps (not a divisor of the 20-step epoch)")
    ap.add_argument("--steps", type=int, default=40, help="steps per run (run.max_steps)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)
    root = Path(tempfile.mkdtemp(prefix="fra-ckpt-bench-"))
    s3 = start_s3(port)
    import boto3

    boto3.client("s3").create_bucket(Bucket="fra-bench")
    server = MlflowServer(f"sqlite:///{root}/mlflow.db", "s3://fra-bench/mlflow", log_path=root / "mlflow.log").start()
    cluster = RayCluster(root, env, {"FRA_STORAGE_PATH": "s3://fra-bench/runs", "MLFLOW_TRACKING_URI": server.url},
                         private_tmp=private_tmp_supported())
    results: dict = {"command": "python benchmarks/checkpoint_upload.py " + " ".join(argv or sys.argv[1:]),
                     "every": args.every, "steps": args.steps, "backbone": args.backbone, "runs": []}
    try:
        cluster.start()
        wd = job_workdir(root / "checkout")
        client = MlflowClient(server.url)
        for rep in range(args.repeats):
            for mode in (("sync", "async") if rep % 2 == 0 else ("async", "sync")):
                name = f"ckpt-{mode}-{rep}"
                sets = [f"run.name={name}", "run.storage_path=$FRA_STORAGE_PATH", f"run.checkpoint_upload={mode}",
                        f"run.checkpoint_every={args.every}", f"run.max_steps={args.steps}", "run.log_every=1",
                        "run.heatmaps_every_epoch=false", "optim.epochs=10", f"model.backbone={args.backbone}",
                        "data.synthetic.num_identities=40", "tracking.experiment=ckpt-bench"]
                cmd = "fra pretrain pipelines/pretrain_demo.yaml " + " ".join(f"--set {s}" for s in sets)
                t0 = time.time()
                code, out = cluster.submit(wd, ["bash", "-lc", cmd], timeout_s=1800)
                wall = time.time() - t0
                if code:
                    raise RuntimeError(f"{name} failed:\n{out[-4000:]}")
                run = client.search_runs([client.get_experiment_by_name("ckpt-bench").experiment_id],
                                         f"attributes.run_name = '{name}'")[0]
                d = step_durations(client, run.info.run_id)
                after = [v for k, v in d.items() if k % args.every == 0]
                other = [v for k, v in d.items() if k % args.every != 0 and k > 2]
                ck = [f for f in st.list_files(f"s3://fra-bench/runs/{name}", recursive=True)
                      if f.endswith("/checkpoint.pt")]
                size = len(st.read_bytes(ck[0])) if ck else 0
                row = {"mode": mode, "repeat": rep, "job_wall_s": round(wall, 1),
                       "median_checkpoint_step_s": round(statistics.median(after), 3),
                       "median_other_step_s": round(statistics.median(other), 3),
                       "checkpoint_cost_s": round(statistics.median(after) - statistics.median(other), 3),
                       "n_after": len(after), "n_other": len(other), "checkpoint_mb": round(size / 2**20, 1)}
                print(json.dumps(row), flush=True)
                results["runs"].append(row)
    finally:
        cluster.stop()
        server.stop()
        s3.terminate()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
