"""FRA's training dynamics, fra vs. the reference implementation, on the same batches.

The golden parity test covers three steps from one init; the cluster-loss plateau of issue 18
is a matter of hundreds. This script trains fra and the reference model side by side for
``--steps`` steps at the region-awareness experiment's settings (ResNet-18, 112 px, K = 4,
dropout 0, LARS lr 0.9 not scaled, batch 32, aligned synthetic faces) and records both sets of
curves: total, instance, region and cluster loss, plus the three region diagnostics
(cluster loss / ln K, spread of the heat-map logits over K, mean pairwise cosine of the mask
embeddings).

* Same init: fra's model is built under ``--seed``; its state dict is loaded into the
  reference model (names match, FRA_SPEC §13.2), so both start from identical weights,
  buffers included.
* Same batches: the two views come from fra's ``LocalTwoViewLoader`` (the plain runner's
  augmentation) and the same normalised float32 tensors go to both models.
* Each side runs its own training step: fra through :func:`fra.engine.train_step` with its
  LARS, lr schedule and EMA; the reference its ``FRAB.forward`` (which updates its ``proto``
  buffers), its ``LARS`` on the groups of its ``collect_params``, its ``warmup_learning_rate`` /
  ``adjust_learning_rate`` schedule and its ``momentum_update(cur_iter, max_iter)``, as its
  ``main.py`` loop calls them.

The reference code is imported from a local, unmodified copy (``--reference DIR`` or
``$FRA_REFERENCE_DIR``) as ``benchmarks/train_step.py`` does; nothing of it is stored here.

    python benchmarks/fra_dynamics.py --reference /tmp/ref_fra --steps 120 --out benchmarks/fra_dynamics.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from fra.config import ModelConfig, OptimConfig  # noqa: E402
from fra.data.local import LocalTwoViewLoader  # noqa: E402
from fra.data.synthetic import SyntheticFaces  # noqa: E402
from fra.engine import Normalizer, Schedule, train_step  # noqa: E402
from fra.losses import FRALoss  # noqa: E402
from fra.losses.diagnostics import dots_spread, mean_pairwise_cosine  # noqa: E402
from fra.models import build_model  # noqa: E402
from fra.optim import build_optimizer  # noqa: E402

CURVES = ("total", "inst", "region", "cluster", "cluster_over_lnk", "dots_spread", "mask_cos")
FRA_KEYS = {"total": "loss", "inst": "loss/inst", "region": "loss/region", "cluster": "loss/cluster",
            "cluster_over_lnk": "diag/cluster_over_lnk", "dots_spread": "diag/dots_spread",
            "mask_cos": "diag/mask_cos"}


def model_config(args) -> ModelConfig:
    # The reference's neck hard-codes 8 decoder heads and a feed-forward width equal to the
    # projection dim: fra is configured the same way so that the two models are the same.
    return ModelConfig(backbone="resnet18", hidden_dim=args.hidden_dim, proj_dim=args.proj_dim,
                       num_proto=args.num_proto, decoder_heads=8, decoder_ffn=args.proj_dim, dropout=0.0,
                       heatmap_scale=args.heatmap_scale, teacher_temp=args.teacher_temp)


class FraSide:
    def __init__(self, cfg: ModelConfig, optim: OptimConfig, iters: int, seed: int):
        torch.manual_seed(seed)
        self.model = build_model(cfg).train()
        self.loss_fn = FRALoss.from_config(cfg)
        self.opt = build_optimizer(self.model, optim)
        self.schedule = Schedule.from_config(optim, cfg, iters)

    def step(self, step: int, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, float]:
        lr, m = self.schedule.lr(step), self.schedule.momentum(step)
        logs = train_step(self.model, self.loss_fn, self.opt, v1, v2, step=step, lr=lr, momentum=m)
        out = {name: float(logs[key]) for name, key in FRA_KEYS.items()}
        out.update(lr=lr, ema=m)
        return out


class ReferenceSide:
    """The reference FRAB, its LARS, lr schedule and EMA, as its main.py train() calls them."""

    def __init__(self, ref: types.SimpleNamespace, ref_dir: str, cfg: ModelConfig, args, state_dict: dict,
                 iters: int):
        import importlib

        self.model = ref.fra.FRAB(
            ref.backbone.__dict__["resnet18_encoder"], dim=cfg.proj_dim, m=cfg.base_momentum,
            hid_dim=cfg.hidden_dim, norm_layer=None, num_neck_mlp=2, scale=cfg.heatmap_scale, l2_norm=True,
            num_heads=8, loss_weight=cfg.loss_weight, mask_type="attn", num_proto=cfg.num_proto,
            teacher_temp=cfg.teacher_temp, loss_w_cluster=cfg.loss_w_cluster)
        for mod in self.model.modules():  # dropout 0 everywhere, as fra's model
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
            elif isinstance(mod, torch.nn.MultiheadAttention):
                mod.dropout = 0.0
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith("encoder_q.")]  # alias of online_net.backbone
        if missing or unexpected:
            raise RuntimeError(f"state dicts differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.model.train()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter name
            groups = ref.collect_params(self.model, exclude_bias_and_bn=True)
        self.opt = ref.LARS(groups, lr=args.lr, momentum=0.9, weight_decay=1e-6)
        self.lr_schedule = importlib.import_module("utils.lr_schedule")
        self.sched_args = types.SimpleNamespace(lr=args.lr, cos=True, warmup_epoch=args.warmup_epochs,
                                                epochs=args.epochs, schedule=[])
        self.iters, self.max_iter = iters, float(iters * args.epochs)
        self.num_proto = cfg.num_proto
        self.captured: dict[str, list] = {"dots": [], "mask": []}
        neck = self.model.online_net.neck
        neck.register_forward_hook(lambda mod, inp, out: self.captured["dots"].append(out[2]["dots"].detach()))
        neck.proj_attn.register_forward_hook(
            lambda mod, inp, out: self.captured["mask"].append(out["mask_embed"].detach().mean(dim=0)))

    def step(self, step: int, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, float]:
        epoch, i = divmod(step, self.iters)
        if i == 0 and epoch >= self.sched_args.warmup_epoch:
            self.lr_schedule.adjust_learning_rate(self.opt, epoch, self.sched_args)
        if epoch < self.sched_args.warmup_epoch:
            self.lr_schedule.warmup_learning_rate(self.opt, step + 1, self.sched_args.warmup_epoch * self.iters,
                                                  self.sched_args)
        lr = self.opt.param_groups[0]["lr"]
        self.captured = {"dots": [], "mask": []}
        loss, pack = self.model(im_v1=v1, im_v2=v2)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.model.momentum_update(float(step), self.max_iter)
        dots, masks = self.captured["dots"], self.captured["mask"]
        return {"total": loss.item(), "inst": pack["inst"].item(), "region": pack["obj"].item(),
                "cluster": pack["clu"].item(), "cluster_over_lnk": pack["clu"].item() / math.log(self.num_proto),
                "dots_spread": float(torch.stack([dots_spread(d) for d in dots]).mean()),
                "mask_cos": float(torch.stack([mean_pairwise_cosine(m) for m in masks]).mean()),
                "lr": lr, "ema": self.model.curr_m}


def summarise(curves: dict[str, dict[str, list[float]]], steps: int) -> dict:
    fra, ref = curves["fra"], curves["reference"]
    out = {}
    for key in CURVES:
        diffs = [abs(a - b) for a, b in zip(fra[key], ref[key])]
        first = next((i for i, d in enumerate(diffs) if d > 1e-4 * max(1.0, abs(ref[key][i]))), None)
        out[key] = {"fra_first": fra[key][0], "ref_first": ref[key][0], "fra_last": fra[key][-1],
                    "ref_last": ref[key][-1], "fra_min": min(fra[key]), "fra_max": max(fra[key]),
                    "ref_min": min(ref[key]), "ref_max": max(ref[key]),
                    "max_abs_diff": max(diffs), "abs_diff_at_step": {str(s): diffs[s] for s in (0, 1, 2, 9, 49, 99)
                                                                    if s < steps},
                    "first_step_rel_diff_above_1e-4": first}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=os.environ.get("FRA_REFERENCE_DIR"),
                    help="local copy of the reference code (default: $FRA_REFERENCE_DIR)")
    ap.add_argument("--no-reference", action="store_true",
                    help="fra alone (a knob probe: its curves and diagnostics, no reference side)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--num-proto", type=int, default=4)
    ap.add_argument("--hidden-dim", type=int, default=512)
    ap.add_argument("--proj-dim", type=int, default=128)
    ap.add_argument("--heatmap-scale", type=float, default=1.0)
    ap.add_argument("--teacher-temp", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=8, help="of the schedule (the experiment's)")
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--identities", type=int, default=250, help="80 %% train, 10 faces each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="float64 separates real differences from float32 rounding drift")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "fra_dynamics.json"))
    args = ap.parse_args(argv)
    if not args.reference and not args.no_reference:
        ap.error("--reference DIR (a local copy of zaczgao/Facial_Region_Awareness) is required, or --no-reference")

    from train_step import import_reference

    torch.set_num_threads(args.threads)
    ref = None if args.no_reference else import_reference(args.reference)
    cfg = model_config(args)
    spec = SyntheticFaces(num_identities=args.identities, images_per_identity=10, size=args.image_size,
                          seed=args.seed, align=True)
    loader = LocalTwoViewLoader(spec, batch_size=args.batch_size, image_size=args.image_size, seed=args.seed)
    iters = len(loader)
    optim = OptimConfig(lr=args.lr, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                        batch_size=args.batch_size)
    dtype = getattr(torch, args.dtype)
    fra_side = FraSide(cfg, optim, iters, args.seed)
    fra_side.model.to(dtype)
    fra_side.opt = build_optimizer(fra_side.model, optim)  # on the converted parameters
    sides = [("fra", fra_side)]
    if ref is not None:
        ref_side = ReferenceSide(ref, args.reference, cfg, args, fra_side.model.state_dict(), iters)
        ref_side.model.to(dtype)
        sides.append(("reference", ref_side))
    norm = Normalizer(dtype=dtype)
    curves = {"fra": {k: [] for k in CURVES + ("lr", "ema")}, "reference": {k: [] for k in CURVES + ("lr", "ema")}}
    t0, step, epoch = time.perf_counter(), 0, 0

    def write(done: int) -> dict:
        """The JSON so far (rewritten every 10 steps, so a run stopped early keeps its curves)."""
        result = {
            "about": "fra vs the reference FRAB on the same augmented batches from the same init "
                     "(benchmarks/fra_dynamics.py)",
            "command": "python benchmarks/fra_dynamics.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "config": {**{k: v for k, v in vars(args).items() if k not in ("out", "reference")},
                       "backbone": "resnet18", "decoder_heads": 8, "decoder_ffn": args.proj_dim, "dropout": 0.0,
                       "iters_per_epoch": iters, "train_faces": len(spec.identities("train")) * 10,
                       "ln_k": math.log(args.num_proto)},
            "environment": {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
                            "note": "shared 2-core machine, other jobs running"},
            "steps_done": done, "complete": done >= args.steps,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "summary": summarise(curves, done) if ref is not None else None,
            "curves": curves,
        }
        Path(args.out).write_text(json.dumps(result, indent=1))
        return result

    while step < args.steps:
        loader.set_epoch(epoch)
        for batch in loader:
            if step >= args.steps:
                break
            v1, v2 = norm(batch["view1"]), norm(batch["view2"])
            for name, side in sides:
                for k, v in side.step(step, v1.clone(), v2.clone()).items():
                    curves[name][k].append(v)
            if step % 10 == 0 or step == args.steps - 1:
                write(step + 1)
                line = " | ".join(
                    f"{name}: total {c['total'][-1]:.4f} inst {c['inst'][-1]:.4f} region {c['region'][-1]:.4f} "
                    f"cluster/lnK {c['cluster_over_lnk'][-1]:.5f} spread {c['dots_spread'][-1]:.5f} "
                    f"mask cos {c['mask_cos'][-1]:.4f}" for name, c in curves.items() if c["total"])
                print(f"step {step:4d}  {line}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            step += 1
        epoch += 1
    result = write(step)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
