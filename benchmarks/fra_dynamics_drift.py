"""Where fra and the reference part ways in float32, and that they do not in float64.

Companion of ``benchmarks/fra_dynamics.py``: the same two models (fra, and the reference loaded
with fra's init) take ``--steps`` training steps on the same random inputs; after each step
every online parameter is compared, ``‖w_fra − w_ref‖ / ‖w_ref‖``. In float64 the two agree to
rounding (~1e-14); in float32 the tensors whose gradient is mostly rounding noise on FRA's
symmetric plateau (the mask-embedding decoder's biases: near-parallel queries, cancelling
terms) differ by percents after one step, and the difference spreads from there.

    python benchmarks/fra_dynamics_drift.py --reference /tmp/ref_fra --out benchmarks/fra_dynamics_drift.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fra_dynamics as fd  # noqa: E402


def run(ref, dtype: torch.dtype, steps: int, batch: int, size: int) -> list[dict]:
    args = types.SimpleNamespace(hidden_dim=512, proj_dim=128, num_proto=4, heatmap_scale=1.0, teacher_temp=0.04,
                                 lr=0.9, epochs=8, warmup_epochs=1)
    from fra.config import OptimConfig
    from fra.optim import build_optimizer

    cfg = fd.model_config(args)
    optim = OptimConfig(lr=0.9, epochs=8, warmup_epochs=1, batch_size=batch)
    f = fd.FraSide(cfg, optim, 10, 0)
    f.model.to(dtype)
    f.opt = build_optimizer(f.model, optim)
    r = fd.ReferenceSide(ref, "", cfg, args, f.model.state_dict(), 10)
    r.model.to(dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for step in range(steps):
        v1 = torch.randn(batch, 3, size, size, generator=gen).to(dtype)
        v2 = torch.randn(batch, 3, size, size, generator=gen).to(dtype)
        lf, lr_ = f.step(step, v1.clone(), v2.clone()), r.step(step, v1.clone(), v2.clone())
        fp, rp = dict(f.model.named_parameters()), dict(r.model.named_parameters())
        errs = {n[len("online_net."):]: ((fp[n] - rp[n]).norm() / rp[n].norm().clamp_min(1e-30)).item()
                for n in fp if n.startswith("online_net.")}
        ranked = sorted(errs.items(), key=lambda kv: -kv[1])
        rows.append({"step": step, "loss_abs_diff": abs(lf["total"] - lr_["total"]),
                     "median_rel_param_diff": sorted(errs.values())[len(errs) // 2],
                     "max_rel_param_diff": ranked[0][1], "worst_tensors": dict(ranked[:5])})
        print(dtype, rows[-1]["step"], f"median {rows[-1]['median_rel_param_diff']:.1e}", ranked[:2], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=os.environ.get("FRA_REFERENCE_DIR"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "fra_dynamics_drift.json"))
    args = ap.parse_args(argv)
    if not args.reference:
        ap.error("--reference DIR (a local copy of zaczgao/Facial_Region_Awareness) is required")
    from train_step import import_reference

    torch.set_num_threads(1)
    ref = import_reference(args.reference)
    out = {"about": __doc__.split("\n\n")[0], "command": "python benchmarks/fra_dynamics_drift.py " +
           " ".join(argv if argv is not None else sys.argv[1:]),
           "config": {"steps": args.steps, "batch_size": args.batch_size, "image_size": args.image_size,
                      "model": "ResNet-18, Hd 512, D 128, K 4, 8 heads, dropout 0, LARS lr 0.9 (warm-up)",
                      "inputs": "N(0,1) images, generator seed 0"},
           "torch": torch.__version__}
    for name in ("float64", "float32"):
        out[name] = run(ref, getattr(torch, name), args.steps, args.batch_size, args.image_size)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
