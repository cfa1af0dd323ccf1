"""Synthetic face generator throughput (issue 2 target: >= 250 img/s per core at 112 px).

Images per CPU-second of one process at one thread, rendering ``SyntheticFaces.sample`` (image,
part mask, 5 landmarks, label) for consecutive identities, median of ``--repeats`` runs, per
size and with/without clutter and alignment.

    python benchmarks/synthetic_faces.py                      # ~1 min
    python benchmarks/synthetic_faces.py --images 200 --sizes 112
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def rate(n: int, size: int, clutter: bool, align: bool) -> float:
    from fra.data.synthetic import SyntheticFaces

    per = 20
    spec = SyntheticFaces(num_identities=max(1, n // per), images_per_identity=per, size=size, seed=7,
                          clutter=clutter, align=align)
    c0 = time.process_time()
    count = 0
    for sample in spec.iter_split("train"):
        count += sample["image"].shape[0] > 0
    for sample in spec.iter_split("test"):
        count += sample["image"].shape[0] > 0
    return count / (time.process_time() - c0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 112, 224])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rate(20, 64, True, False)  # warm imports and caches
    rows = []
    for size in args.sizes:
        for clutter, align in ((True, False), (False, False), (True, True)):
            runs = [rate(args.images, size, clutter, align) for _ in range(args.repeats)]
            rows.append({"size": size, "clutter": clutter, "align": align,
                         "img_per_cpu_s": round(statistics.median(runs), 1), "runs": [round(r, 1) for r in runs]})
            print(f"| {size} | {clutter} | {align} | {rows[-1]['img_per_cpu_s']:.0f} |", flush=True)
    out = {"images": args.images, "loadavg": os.getloadavg(), "rows": rows,
           "date": time.strftime("%Y-%m-%d")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
