"""The end of every pretraining run, plain or on Ray: one function writes the final outputs.

Both runners hand :func:`finalize_run` the file of their last full checkpoint; it writes
``<run>/final/`` (``checkpoint.pt`` and the resolved ``config.yaml``) and ``<run>/export/``
(``backbone.pt``, ``model_card.json`` and, for SwAV, ``frl_checkpoint.pth`` in FRL's release
layout), scoring FRA's region awareness first on synthetic faces. The folders are staged locally
and published to the run folder, which may be a URI. No Ray, no MLflow: the runners log what it
returns.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fra import storage as st
from fra.config import PretrainConfig, dump_yaml, view_normalization
from fra.train.checkpointing import CHECKPOINT_FILE, export_backbone, load_checkpoint, restore

log = logging.getLogger(__name__)

FINAL_DIR, EXPORT_DIR = "final", "export"
FRL_EXPORT = "frl_checkpoint.pth"  # SwAV runs: the model in FRL's release layout
REGION_SCORE_IMAGES = 48


@dataclass
class FinalOutputs:
    """Where :func:`finalize_run` put things (strings: the run folder may be a URI)."""

    checkpoint: str  # <run>/final/checkpoint.pt
    backbone: str  # <run>/export/backbone.pt
    model_card: str  # <run>/export/model_card.json
    step: int
    epoch: int
    region_score: dict | None  # FRA on synthetic faces: region awareness vs ground-truth parts


def finalize_run(cfg: PretrainConfig, checkpoint: str | Path, run_dir: str, *, fingerprint: str = "",
                 extra_card: dict | None = None) -> FinalOutputs:
    """Write ``<run_dir>/final`` and ``<run_dir>/export`` from the run's last full checkpoint.

    Args:
        cfg: the run's resolved config (saved as ``final/config.yaml`` and in the model card).
        checkpoint: a local full-checkpoint file (:func:`fra.train.checkpointing.save_checkpoint`).
        run_dir: the run folder, a local path or a URI.
        fingerprint: the data manifest's fingerprint, recorded in the model card.
        extra_card: more model-card entries from the runner (e.g. Ray's checkpoint location).
    """
    from fra.models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        final, export = Path(tmp) / FINAL_DIR, Path(tmp) / EXPORT_DIR
        final.mkdir()
        shutil.copyfile(checkpoint, final / CHECKPOINT_FILE)
        dump_yaml(cfg, final / "config.yaml")
        model = build_model(cfg.model)
        state = restore(load_checkpoint(final / CHECKPOINT_FILE), model, restore_rng=False)
        region = region_score(cfg, model)
        extra = {"steps": state.step, **(extra_card or {})}
        if region:
            extra["region_awareness"] = region
        export_backbone(model, export, cfg, cfg.data.image_size, manifest_fingerprint=fingerprint,
                        extra_card=extra, epoch=state.epoch)
        if cfg.model.method == "swav":  # also in FRL's release layout (FRL_SPEC §1.6)
            from fra.models.swav import frl_checkpoint
            from fra.utils.io import atomic_torch_save

            atomic_torch_save(frl_checkpoint(model, state.epoch), export / FRL_EXPORT)
        for sub in (final, export):
            st.publish(sub, st.join(run_dir, sub.name))
    return FinalOutputs(st.join(run_dir, FINAL_DIR, CHECKPOINT_FILE), st.join(run_dir, EXPORT_DIR, "backbone.pt"),
                        st.join(run_dir, EXPORT_DIR, "model_card.json"), state.step, state.epoch, region)


def region_score(cfg: PretrainConfig, model) -> dict | None:
    """Region-awareness of a finished FRA model on held-out synthetic faces (issue #8 §3).

    Only runs with ground-truth part masks are scored: FRA on rendered synthetic faces
    (``data.source: synthetic``); the test identities of the same generator are used. Returns
    the headline numbers (matched mIoU, NMI) with the random-init model's and random heat
    maps' as baselines, or None.
    """
    if cfg.model.method != "fra" or cfg.data.source != "synthetic":
        return None
    from fra.data.synthetic import SyntheticFaces
    from fra.evaluation.region_score import score_model

    s = cfg.data.synthetic
    spec = SyntheticFaces(num_identities=s.num_identities, images_per_identity=s.images_per_identity, size=s.size,
                          seed=s.seed, intensity=tuple(s.intensity), jitter=s.jitter, align=s.align)
    mean, std = view_normalization(cfg)
    n = min(REGION_SCORE_IMAGES, spec.split_size("test"))
    if n == 0:
        log.warning("region-awareness score skipped: the synthetic test split is empty")
        return None
    out = score_model(model.eval(), spec, n, cfg.data.image_size, mean, std, baseline=True, seed=cfg.run.seed)
    keys = ("miou", "best_iou", "nmi", "init_miou", "init_best_iou", "init_nmi", "random_miou", "random_best_iou",
            "random_nmi", "norm_nmi", "init_norm_nmi", "random_norm_nmi", "gain_norm_nmi", "floor_nmi", "oracle_nmi",
            "n_images")
    score = {k: out[k] for k in keys if k in out}
    log.info("region awareness on %d held-out faces: mIoU %.3f (random init %.3f, random maps %.3f), "
             "NMI %.3f (random init %.3f)", score["n_images"], score["miou"], score["init_miou"],
             score["random_miou"], score["nmi"], score["init_nmi"])
    return score
