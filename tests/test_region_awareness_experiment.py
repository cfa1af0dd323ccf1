"""pipelines/region_awareness.yaml loads, and its pass criteria are judged as written (no training)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fra.errors import ConfigError
from fra.experiments.region_awareness import is_region_awareness_file, load_region_awareness, pretrain_config, \
    verdict

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "region_awareness.yaml"


def test_shipped_pipeline_is_the_issue_18_experiment(tmp_path):
    assert is_region_awareness_file(PIPELINE)
    cfg = load_region_awareness(PIPELINE, [f"storage_path={tmp_path}"])
    assert cfg.seeds == [0, 1]
    assert (cfg.criteria.max_cluster_over_lnk, cfg.criteria.min_gain_norm_nmi) == (0.9, 0.1)
    pre = pretrain_config(cfg, 1)
    assert (pre.model.backbone, pre.model.num_proto, pre.model.dropout, pre.data.image_size) == ("resnet18", 4, 0.0, 112)
    assert (pre.optim.optimizer, pre.optim.lr, pre.optim.lr_scaling) == ("lars", 0.9, "none")
    assert pre.run.seed == 1 and pre.data.seed == 1 and pre.run.storage_path.startswith(str(tmp_path))
    # 200 train identities x 10 faces, batch 32: 62 steps per epoch, ~500 steps in all
    assert 450 <= (200 * 10 // pre.optim.batch_size) * pre.optim.epochs <= 550


@pytest.mark.parametrize("cluster, gain, passed", [(0.85, 0.15, True), (0.95, 0.5, False), (0.5, 0.05, False),
                                                   (0.9, 0.1, False)])
def test_verdict_follows_the_written_criteria(tmp_path, cluster, gain, passed):
    cfg = load_region_awareness(PIPELINE, [f"storage_path={tmp_path}"])
    # strictly below 0.9 ln K, gain at least 0.1 (0.9 itself does not pass)
    assert verdict(cfg, {"cluster_over_lnk_end": cluster, "gain_norm_nmi": gain})["passed"] is passed


def test_needs_fra_on_synthetic_faces(tmp_path):
    with pytest.raises(ConfigError, match="method must be fra"):
        load_region_awareness(PIPELINE, [f"storage_path={tmp_path}", "pretrain.model.method=byol"])
