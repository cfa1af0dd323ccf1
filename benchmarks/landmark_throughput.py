"""Face-alignment job throughput read from a method benchmark's runs (issue 14 §7).

The method benchmark (``fra run pipelines/benchmark_synthetic.yaml``) runs the landmark job
(``fra.evaluation.landmarks``, Ray Train, one worker) once per method and seed; each run's
``results.json`` has per epoch the training images/s of the worker's loop and the seconds of the
test pass. This script collects them (no new run):

    .venv/bin/python benchmarks/landmark_throughput.py runs/benchmark_synthetic/results.json \
        --out benchmarks/landmark_throughput.json

Per run: training images/s (median over epochs, the worker's loop only), evaluation images/s
(median over epochs of test images / test-pass seconds) and the job's wall seconds (driver side:
backbone, Ray Train start-up, Ray Data streams, MLflow).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def throughput(results_path: str) -> dict:
    res = json.loads(Path(results_path).read_text())
    hist = res["history"]
    train = [h["train_images_per_s"] for h in hist if h.get("train_images_per_s")]
    evals = [h["test"]["full"]["count"] / h["eval_seconds"] for h in hist if h.get("eval_seconds") and "test" in h]
    return {"epochs": len(hist), "train_images": sum(h.get("images", 0) for h in hist),
            "test_images": hist[-1]["test"]["full"]["count"] if "test" in hist[-1] else None,
            "image_size": res["config"]["data"]["image_size"], "batch_size": res["config"]["optim"]["batch_size"],
            "train_images_per_s": statistics.median(train), "eval_images_per_s": statistics.median(evals),
            "job_seconds": res["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a method benchmark's results.json")
    ap.add_argument("--out", default="", help="write the table as JSON here")
    args = ap.parse_args()
    cells = json.loads(Path(args.results).read_text())["cells"]
    rows = {}
    for key, cell in cells.items():
        for label, lm in (cell.get("landmarks") or {}).items():
            rows[f"{key} {label}"] = throughput(lm["results_path"])
    for name, r in rows.items():
        print(f"{name:34s} train {r['train_images_per_s']:6.1f} img/s  eval {r['eval_images_per_s']:6.1f} img/s  "
              f"job {r['job_seconds']:5.1f} s")
    train = [r["train_images_per_s"] for r in rows.values()]
    evals = [r["eval_images_per_s"] for r in rows.values()]
    summary = {"runs": len(rows), "train_images_per_s_median": statistics.median(train),
               "train_images_per_s_range": [min(train), max(train)],
               "eval_images_per_s_median": statistics.median(evals), "eval_images_per_s_range": [min(evals), max(evals)]}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"source": args.results, "summary": summary, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
