"""Short knob probes of the region-awareness experiment (issue 18 §3), fra alone, in process.

Trains the experiment's own recipe (``pipelines/region_awareness.yaml``, any ``--set`` override
applied, as ``fra run`` would) for ``--steps`` steps with the plain runner's pieces (same faces,
loader, init, LARS and schedule as :func:`fra.train.plain.pretrain_plain`), logs every
``--every`` steps the three region diagnostics plus a decomposition of the cluster loss, and
scores the final heat maps the way the experiment does (normalised NMI, gain over step 0).

Cluster loss per view = CE(t, p) + (ln K − H(p̄)), with CE = H(t) + KL(t‖p). The extra columns:

* ``H(t)/lnK``: entropy of the Sinkhorn teacher per pixel (1 = uniform target);
* ``H(p)/lnK``: entropy of the student softmax(dots/τs) per pixel (1 = uniform student);
* ``pix spread``: std over K of the student's heat-map logits after removing each query's mean
  over the batch's pixels, i.e. the pixel-dependent part of the spread (a per-query offset
  moves the student's mean assignment, which Sinkhorn and the mean-entropy term undo).

    python benchmarks/region_probe.py --steps 60 --set pretrain.model.loss_w_cluster=0.5 --out /tmp/p.json

CPU seconds (process) are recorded next to the wall time; the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fra.config import view_normalization  # noqa: E402
from fra.data.local import LocalTwoViewLoader  # noqa: E402
from fra.data.synthetic import SyntheticFaces  # noqa: E402
from fra.engine import Normalizer, Schedule, train_step  # noqa: E402
from fra.evaluation.region_score import score_model  # noqa: E402
from fra.experiments.region_awareness import load_region_awareness, pretrain_config  # noqa: E402
from fra.losses import build_loss  # noqa: E402
from fra.losses.cluster import _rows, sinkhorn  # noqa: E402
from fra.models import build_model  # noqa: E402
from fra.optim import build_optimizer  # noqa: E402


@torch.no_grad()
def decompose(student: torch.Tensor, teacher: torch.Tensor, cluster) -> dict[str, float]:
    """Teacher / student entropies and the pixel-dependent spread of one view's logits."""
    k = student.shape[1]
    t = sinkhorn(F.softmax(_rows(teacher) / cluster.teacher_temp, dim=1), cluster.sinkhorn_iters)
    p = F.softmax(_rows(student) / cluster.student_temp, dim=1)
    ent = lambda x: float(-(x * x.clamp_min(1e-30).log()).sum(dim=1).mean()) / math.log(k)  # noqa: E731
    centred = student - student.mean(dim=(0, 2, 3), keepdim=True)
    agree = float((t.argmax(dim=1) == p.argmax(dim=1)).float().mean())
    return {"H_t": ent(t), "H_p": ent(p), "pix_spread": float(centred.std(dim=1, unbiased=False).mean()),
            "argmax_agree": agree}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default=str(REPO / "pipelines" / "region_awareness.yaml"))
    ap.add_argument("--set", action="append", default=[], help="override of the pipeline file, as fra run --set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-score", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_region_awareness(args.pipeline, args.set)
    pre = pretrain_config(cfg, args.seed)
    torch.manual_seed(pre.run.seed)
    s = pre.data.synthetic
    spec = SyntheticFaces(num_identities=s.num_identities, images_per_identity=s.images_per_identity, size=s.size,
                          seed=s.seed, intensity=tuple(s.intensity), jitter=s.jitter, align=s.align)
    loader = LocalTwoViewLoader(spec, batch_size=pre.optim.batch_size, image_size=pre.data.image_size,
                                seed=pre.data.seed)
    iters = len(loader)
    model = build_model(pre.model)
    loss_fn = build_loss(pre.model)
    opt = build_optimizer(model, pre.optim)
    schedule = Schedule.from_config(pre.optim, pre.model, iters)
    mean, std = view_normalization(pre)
    norm = Normalizer(mean, std)
    captured: list = []
    loss_fn.cluster.register_forward_hook(lambda mod, inp, out: captured.append((inp[0].detach(), inp[1].detach())))
    rows, t0, c0, step, epoch = [], time.perf_counter(), time.process_time(), 0, 0
    total = min(args.steps, schedule.total_steps)
    print(f"{iters} steps/epoch, schedule {schedule.total_steps} steps, probing {total}", flush=True)
    while step < total:
        loader.set_epoch(epoch)
        for batch in loader:
            if step >= total:
                break
            captured.clear()
            logs = train_step(model, loss_fn, opt, norm(batch["view1"]), norm(batch["view2"]), step=step,
                              lr=schedule.lr(step), momentum=schedule.momentum(step))
            if step % args.every == 0 or step == total - 1:
                parts = [decompose(st, te, loss_fn.cluster) for st, te in captured]
                row = {"step": step, "loss": float(logs["loss"]), "inst": float(logs["loss/inst"]),
                       "region": float(logs["loss/region"]),
                       **{k.split("/")[1]: float(logs[k]) for k in ("diag/cluster_over_lnk", "diag/dots_spread",
                                                                    "diag/mask_cos")},
                       **{k: sum(p[k] for p in parts) / len(parts) for k in parts[0]},
                       "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
                rows.append(row)
                print(f"step {step:4d} clu/lnK {row['cluster_over_lnk']:.4f} H(t)/lnK {row['H_t']:.3f} "
                      f"H(p)/lnK {row['H_p']:.4f} spread {row['dots_spread']:.4f} pix spread {row['pix_spread']:.4f} "
                      f"mask cos {row['mask_cos']:.4f} agree {row['argmax_agree']:.2f} | inst {row['inst']:.3f} "
                      f"region {row['region']:.3f} | {row['wall_s']:.0f} s wall {row['cpu_s']:.0f} CPU-s",
                      flush=True)
            step += 1
        epoch += 1
    result = {"command": "python benchmarks/region_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": total, "iters_per_epoch": iters, "wall_s": round(time.perf_counter() - t0, 1),
              "cpu_s": round(time.process_time() - c0, 1), "threads": args.threads, "rows": rows,
              "note": "shared 2-core machine: wall times inflated; CPU-s is the process's"}
    if not args.no_score:
        n = min(cfg.score.n_images, spec.split_size("test"))
        sc = score_model(model.eval(), spec, n, pre.data.image_size, mean, std, mode=cfg.score.mode, baseline=True,
                         seed=pre.run.seed, min_cells=cfg.score.min_cells)
        result["score"] = {k: v for k, v in sc.items() if not isinstance(v, dict)}
        print(f"score: norm NMI {sc['init_norm_nmi']:.3f} -> {sc['norm_nmi']:.3f} (gain {sc['gain_norm_nmi']:+.3f}), "
              f"NMI {sc['nmi']:.3f} (oracle {sc['oracle_nmi']:.3f})", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
