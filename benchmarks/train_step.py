"""CPU cost of one FRA pretraining step, fra vs. the reference implementation.

One step = forward of both views through the online and the target network, the FRA loss,
backward, LARS step, EMA of the target, plus what each loop does with the loss values: the
reference reads them every step (``.item()``), fra as :func:`fra.engine.train_one_epoch` does
(flags non-finite values and sums them on the device, reads them every ``--log-every`` steps). The figure is
process CPU-seconds (``time.process_time``) per step at one intra-op thread, median over the
timed steps after warm-up: on a shared machine it is far more stable than wall time.

With ``--reference DIR`` (or ``FRA_REFERENCE_DIR``) pointing at a local, unmodified copy of
the reference code, the reference model and its own LARS are built the same way and timed in
the same process on the same inputs, steps interleaved; both get the weights of
``tests/parity/recipe.py``, so their first-step losses must agree (to float32 rounding).
Without it, the reference's recorded figures (FRA_SPEC §12) are used.

``--prototype`` adds fra with speed-ups not (yet) in the library (channels-last backbone
maps, a fused LARS, the EMA as one lerp) and ``--bf16`` that prototype under CPU bf16
autocast, to show what they would buy.

    python benchmarks/train_step.py --reference /path/to/Facial_Region_Awareness --prototype
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from parity.recipe import deterministic_init_, make_inputs  # noqa: E402

# name -> (backbone, batch, image size); K = 8, Hd = 4096 for all.
CONFIGS = {"r18": ("resnet18", 32, 96), "r50": ("resnet50", 16, 112), "tiny": ("resnet18", 8, 64)}
# Reference CPU-s/step at 1 thread, fp32, Hd=4096 (FRA_SPEC §12), used without --reference.
RECORDED_REFERENCE = {"r18": 4.52, "r50": 7.96, "tiny": 1.68}
MAX_ITER = 1000
PHASES = ("forward", "backward", "optimizer", "ema")


class FraRunner:
    """fra's model, loss, LARS and EMA, driven as the training loop drives them."""

    name = "fra"

    def __init__(self, backbone: str, hidden_dim: int, num_proto: int, dropout: float, log_every: int = 10):
        from fra.config import ModelConfig
        from fra.losses import FRALoss
        from fra.models import build_model
        from fra.nonfinite import FiniteCheck
        from fra.optim import LARS, ema_momentum, lars_param_groups

        cfg = ModelConfig(backbone=backbone, hidden_dim=hidden_dim, num_proto=num_proto, dropout=dropout)
        self.model = build_model(cfg).train()
        deterministic_init_(self.model)
        self.criterion = FRALoss.from_config(cfg)
        self.opt = LARS(lars_param_groups(self.model, 1e-6), lr=0.9, momentum=0.9, eta=1e-3)
        self.ema_momentum = ema_momentum
        self.autocast = contextlib.nullcontext
        self.step_idx = 0
        self.finite, self.log_every, self.sums = FiniteCheck(), log_every, None

    def step(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """fra.engine.train_step's calls, timed phase by phase; returns the (unread) loss."""
        t0 = time.process_time()
        with self.autocast():
            out = self.model(v1, v2)
            logs = self.criterion(out)
        self.model.after_forward(out)
        t1 = time.process_time()
        self.opt.zero_grad(set_to_none=True)
        logs["loss"].backward()
        self.model.after_backward(self.step_idx)
        t2 = time.process_time()
        self.opt.step()
        t3 = time.process_time()
        self.model.after_step(self.step_idx, self.ema_momentum(self.step_idx, MAX_ITER))
        t4 = time.process_time()
        values = torch.stack([v.detach().float() for v in logs.values()])
        self.finite.record(tuple(logs), values, self.step_idx)
        self.sums = values.double() if self.sums is None else self.sums.add_(values)
        self.step_idx += 1
        if self.step_idx % self.log_every == 0:  # a log step: the check and one read of the losses
            self.finite.check()
            values.tolist()
        t5 = time.process_time()
        return logs["loss"].detach(), dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3 + t5 - t4)))


# The fused LARS prototyped here was merged into fra.optim.LARS; kept as a name for the runner below.
from fra.optim import LARS as FusedLARS  # noqa: E402


class FraPrototypeRunner(FraRunner):
    """fra plus the speed-ups proposed to the lead: channels-last backbone maps, the fused
    LARS above and the EMA as one ``_foreach_lerp_``. Same numbers up to rounding."""

    name = "fra-prototype"

    def __init__(self, *args):
        super().__init__(*args)
        self.model.to(memory_format=torch.channels_last)
        self.opt = FusedLARS(self.opt.param_groups, lr=0.9, momentum=0.9, eta=1e-3)
        model = self.model

        @torch.no_grad()
        def lerp_ema(m: float) -> None:
            torch._foreach_lerp_(list(model.target_net.parameters()),
                                 list(model.online_net.parameters()), 1.0 - m)

        self.model.momentum_update = lerp_ema

    def step(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[float, dict[str, float]]:
        fmt = torch.channels_last
        return super().step(v1.contiguous(memory_format=fmt), v2.contiguous(memory_format=fmt))


class FraBf16Runner(FraPrototypeRunner):
    """The prototype under CPU bf16 autocast: the CPU counterpart of the reference README's
    ``--amp`` (fp16 autocast on GPU). Not the same arithmetic as the fp32 reference."""

    name = "fra-prototype-bf16"

    def __init__(self, *args):
        super().__init__(*args)
        self.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def import_reference(ref_dir: str) -> types.SimpleNamespace:
    """Imports the reference's model, LARS and ``collect_params`` from a local copy.

    Only the two helpers it imports from frameworks are stubbed (classy_vision's
    ``is_distributed_training_run`` predicate; fvcore's ``c2_xavier_fill``, of which the
    reference ships its own copy in ``utils/init.py``), and the top-level name
    ``transformers`` is bound to the reference's ``models/transformers`` package, not
    HuggingFace's (FRA_SPEC §10 item 13).
    """
    import torch.distributed as dist

    ref_dir = os.path.abspath(ref_dir)
    sys.path.insert(0, ref_dir)
    for name in ("classy_vision", "classy_vision.generic", "fvcore", "fvcore.nn"):
        sys.modules.setdefault(name, types.ModuleType(name))
    util = types.ModuleType("classy_vision.generic.distributed_util")
    util.is_distributed_training_run = lambda: (dist.is_available() and dist.is_initialized()
                                                and dist.get_world_size() > 1)
    sys.modules[util.__name__] = util
    import utils.init as ref_init

    weight_init = types.ModuleType("fvcore.nn.weight_init")
    weight_init.c2_xavier_fill = ref_init.c2_xavier_fill
    sys.modules[weight_init.__name__] = weight_init
    tdir = os.path.join(ref_dir, "models", "transformers")
    spec = importlib.util.spec_from_file_location("transformers", os.path.join(tdir, "__init__.py"),
                                                  submodule_search_locations=[tdir])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["transformers"] = pkg
    spec.loader.exec_module(pkg)

    import backbone as ref_backbone
    import models.fra as ref_fra
    from utils.LARS import LARS as RefLARS

    # main.collect_params, run from the local copy's own source (main.py needs the data stack)
    main_py = os.path.join(ref_dir, "main.py")
    tree = ast.parse(Path(main_py).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "collect_params")
    namespace: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), main_py, "exec"), namespace)
    return types.SimpleNamespace(fra=ref_fra, backbone=ref_backbone, LARS=RefLARS,
                                 collect_params=namespace["collect_params"])


class ReferenceRunner:
    """The reference FRAB model (README flags, plain BN) and its LARS, as its main.py runs them."""

    name = "reference"

    def __init__(self, ref: types.SimpleNamespace, backbone: str, hidden_dim: int, num_proto: int,
                 dropout: float):
        import io

        self.model = ref.fra.FRAB(
            ref.backbone.__dict__[f"{backbone}_encoder"], dim=256, m=0.996, hid_dim=hidden_dim,
            norm_layer=None, num_neck_mlp=2, scale=1.0, l2_norm=True, num_heads=8, loss_weight=0.5,
            mask_type="attn", num_proto=num_proto, teacher_temp=0.04, loss_w_cluster=0.1)
        for m in self.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = dropout
            elif isinstance(m, torch.nn.MultiheadAttention):
                m.dropout = dropout
        self.model.train()
        deterministic_init_(self.model)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter name
            groups = ref.collect_params(self.model, exclude_bias_and_bn=True)
        self.opt = ref.LARS(groups, lr=0.9, momentum=0.9, weight_decay=1e-6)
        self.step_idx = 0

    def step(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[float, dict[str, float]]:
        t0 = time.process_time()
        loss, pack = self.model(v1, v2)
        t1 = time.process_time()
        self.opt.zero_grad()
        loss.backward()
        t2 = time.process_time()
        self.opt.step()
        t3 = time.process_time()
        self.model.momentum_update(float(self.step_idx), float(MAX_ITER))
        self.step_idx += 1
        t4 = time.process_time()
        value = loss.item()
        for key in ("base", "inst", "obj", "clu"):
            pack[key].item()
        t5 = time.process_time()
        return value, dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3 + t5 - t4)))


def bench(runners: list, v1: torch.Tensor, v2: torch.Tensor, warmup: int, steps: int) -> dict:
    """Interleaves the runners step by step; returns per runner the first loss and CPU times."""
    res = {r.name: {"cpu": [], "phases": [], "first_loss": None} for r in runners}
    for i in range(warmup + steps):
        for r in runners:
            t0 = time.process_time()
            loss, phases = r.step(v1, v2)
            cpu = time.process_time() - t0
            rec = res[r.name]
            if rec["first_loss"] is None:
                rec["first_loss"] = float(loss)
            if i >= warmup:
                rec["cpu"].append(cpu)
                rec["phases"].append(phases)
    for rec in res.values():
        rec["median"] = statistics.median(rec["cpu"])
        rec["phase_median"] = {p: statistics.median(ph[p] for ph in rec["phases"]) for p in PHASES}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="r18,r50", help=f"comma list of {sorted(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=10, help="fra reads its losses every N steps (run.log_every)")
    ap.add_argument("--hidden-dim", type=int, default=4096)
    ap.add_argument("--num-proto", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="transformer dropout (0 so both sides compute the same loss)")
    ap.add_argument("--prototype", action="store_true",
                    help="also time fra with the proposed speed-ups (channels-last, fused LARS, lerp EMA)")
    ap.add_argument("--bf16", action="store_true",
                    help="also time the prototype under CPU bf16 autocast (different arithmetic)")
    ap.add_argument("--reference", default=os.environ.get("FRA_REFERENCE_DIR"),
                    help="local copy of the reference code (default: $FRA_REFERENCE_DIR)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    ref = import_reference(args.reference) if args.reference else None
    model_args = (args.hidden_dim, args.num_proto, args.dropout)
    rows = []
    for key in args.configs.split(","):
        backbone, batch, size = CONFIGS[key]
        v1, v2 = (v.float() for v in make_inputs(batch, size, seed=0))
        runners = [FraRunner(backbone, *model_args, args.log_every)]
        if args.prototype:
            runners.append(FraPrototypeRunner(backbone, *model_args))
        if args.bf16:
            runners.append(FraBf16Runner(backbone, *model_args))
        if ref is not None:
            runners.append(ReferenceRunner(ref, backbone, *model_args))
        rows.append((key, backbone, batch, size, bench(runners, v1, v2, args.warmup, args.steps)))
        del runners

    source = "measured side by side, steps interleaved" if ref is not None else "recorded (FRA_SPEC §12)"
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32, K={args.num_proto}, "
          f"Hd={args.hidden_dim}, dropout {args.dropout}, median of {args.steps} steps after "
          f"{args.warmup} warm-up, fra reads its losses every {args.log_every} steps; reference: {source}\n")
    print("| config | implementation | CPU-s/step | vs reference | fwd / bwd / LARS / EMA+log (s) | loss at step 0 |")
    print("|---|---|---|---|---|---|")
    for key, backbone, batch, size, res in rows:
        if "reference" in res:
            ref_cpu = res["reference"]["median"]
        else:
            ref_cpu = RECORDED_REFERENCE[key] if args.hidden_dim == 4096 else float("nan")
            res = dict(res, reference={"median": ref_cpu, "phase_median": None, "first_loss": None})
        for name, rec in res.items():
            phases = " / ".join(f"{rec['phase_median'][p]:.2f}" for p in PHASES) if rec["phase_median"] else "–"
            loss = f"{rec['first_loss']:.7f}" if rec["first_loss"] is not None else "–"
            ratio = f"**{rec['median'] / ref_cpu:.2f}x**" if name != "reference" else "1.00x"
            print(f"| {key}: {backbone}, B={batch}, {size} px | {name} | {rec['median']:.2f} | {ratio} | "
                  f"{phases} | {loss} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
