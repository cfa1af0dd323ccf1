"""The attribute / affect loop in process (no Ray): heads, losses, schedule, linear-probe guarantee."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fra.evaluation.target_loop import TargetTask, build_model, fit, task_loss
from fra.evaluation.target_metrics import attribute_report
from fra.evaluation.worker import LoopSpec
from fra.models.heads import AttributeMLP, ccc_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(protocol: str, outputs: int, **kw) -> LoopSpec:
    base = dict(protocol=protocol, arch="resnet18", num_classes=outputs, optimizer="adamw", lr=1e-3, lr_head=1e-3,
                weight_decay=0.0, momentum=0.9, epochs=2, warmup_epochs=0, min_lr=0.0, batch_size=4,
                iters_per_epoch=2, last_k=2)
    return LoopSpec(**{**base, **kw})


def _batches(column: str, outputs: int, seed: int, binary: bool):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        y = (torch.rand(4, outputs, generator=g) < 0.5).float() if binary else torch.rand(4, outputs, generator=g) * 2 - 1
        out.append({"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g), column: y})
    return out


def test_attribute_head_is_the_reference_mlp():
    torch.manual_seed(0)
    model = build_model("resnet18", TargetTask("attributes", "attributes", 40), None)
    assert isinstance(model.fc, AttributeMLP)
    kinds = [type(m).__name__ for m in model.fc]
    assert kinds == ["Linear", "BatchNorm1d", "Dropout", "ReLU"] * 2 + ["Linear"]  # dropout before ReLU
    assert [m.out_features for m in model.fc if isinstance(m, torch.nn.Linear)] == [512, 256, 40]
    assert model.fc[0].in_features == 512


def test_losses_by_hand():
    task = TargetTask("attributes", "attributes", 2)
    logits, y = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    expected = (np.log(2) + np.log(1 + np.exp(2.0))) / 2  # -log sigmoid(0), -log(1 - sigmoid(2))
    assert float(task_loss(task, logits, y)) == pytest.approx(expected, rel=1e-6)
    pred, target = torch.tensor([[0.4], [-0.2], [0.1], [0.7]]), torch.tensor([[0.5], [-0.5], [0.0], [1.0]])
    assert float(ccc_loss(pred, target)) == pytest.approx(1 - 15 / 17, abs=1e-6)  # CCC 15/17 by hand
    affect = TargetTask("affect", "targets", 1, head="linear", loss="mse+ccc")
    assert float(task_loss(affect, pred, target)) == pytest.approx(1 - 15 / 17 + 0.05, abs=1e-6)


@pytest.mark.parametrize("protocol", ["finetune", "linear"])
def test_fit_records_stats_and_a_linear_probe_keeps_the_trunk(protocol):
    torch.manual_seed(0)
    task = TargetTask("attributes", "attributes", 3)
    model = build_model("resnet18", task, None)
    train, test = _batches("attributes", 3, 1, True), _batches("attributes", 3, 2, True)
    out = fit(model, _spec(protocol, 3), task, lambda e: train, lambda e: test)
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    report = attribute_report(out["history"][-1]["test_stats"], ["a", "b", "c"])
    assert report["num_samples"] == 8
    assert out["backbone_unchanged"] is (protocol == "linear")


def test_affect_fit_reduces_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    task = TargetTask("affect", "targets", 2, head="linear", loss="mse")
    model = build_model("resnet18", task, None)
    batch = _batches("targets", 2, 3, False)[:1]
    out = fit(model, _spec("finetune", 2, epochs=6, iters_per_epoch=1, lr=3e-3, lr_head=3e-3, last_k=1, eval_every=6),
              task,
              lambda e: batch, lambda e: batch)
    losses = [h["train_loss"] for h in out["history"]]
    assert losses[-1] < 0.5 * losses[0]
    assert len(out["history"][-1]["test_stats"]) == 8  # AFFECT_STATS rows


def test_jobs_refuse_shards_without_targets_and_fer_only_options_before_starting_ray(tmp_path):
    from fra.config import load_config
    from fra.data.shards import write_shards
    from fra.errors import ConfigError
    from fra.evaluation.affect import AffectConfig, evaluate_affect
    from fra.evaluation.attributes import AttributesConfig, evaluate_attributes

    shards = write_shards("synthetic_faces", "", str(tmp_path / "s"), parallel=False, num_identities=2,
                          images_per_identity=1, size=32).uri
    base = {"data": {"shards": shards}, "run": {"storage_path": str(tmp_path)}}
    with pytest.raises(ConfigError, match="has no attributes"):
        evaluate_attributes(load_config(AttributesConfig, data=base))
    with pytest.raises(ConfigError, match="has no targets"):
        evaluate_affect(load_config(AffectConfig, data=base))
    with pytest.raises(ConfigError, match="val_fraction is not supported"):
        evaluate_affect(load_config(AffectConfig, data={**base, "data": {"shards": shards, "val_fraction": 0.1}}))


class _Stop(Exception):
    pass


def test_every_evaluation_starts_fras_ray_before_it_builds_a_dataset(tmp_path, monkeypatch):
    """Reading or materializing a Ray Data dataset starts a default local Ray when none runs (one
    logical CPU per core, unknown to fra's console, whose Ray lines then reached the terminal at
    exit). So each evaluation must call ``init_ray`` first; the dataset builders stop the job here."""
    import fra.evaluation.data
    import fra.evaluation.landmarks_data
    import fra.evaluation.targets
    import fra.ray_runtime
    from fra.config import load_config
    from fra.data.shards import write_shards
    from fra.evaluation.affect import AffectConfig, evaluate_affect
    from fra.evaluation.attributes import AttributesConfig, evaluate_attributes
    from fra.evaluation.fer import FERConfig, evaluate_fer
    from fra.evaluation.landmarks import LandmarkConfig, evaluate_landmarks

    calls = []

    def record(name, stop=False):
        def call(*args, **kwargs):
            calls.append(name)
            if stop:
                raise _Stop
            return "initialized"
        return call

    monkeypatch.setattr(fra.ray_runtime, "init_ray", record("init_ray"))
    monkeypatch.setattr(fra.evaluation.data, "fer_datasets", record("datasets", stop=True))
    monkeypatch.setattr(fra.evaluation.targets, "datasets", record("datasets", stop=True))
    monkeypatch.setattr(fra.evaluation.landmarks_data, "landmark_datasets", record("datasets", stop=True))
    faces = write_shards("synthetic_faces", "", str(tmp_path / "faces"), parallel=False, num_identities=2,
                         images_per_identity=2, size=32, with_attributes=True).uri
    points = write_shards("synthetic_landmarks", "", str(tmp_path / "points"), parallel=False, num_identities=2,
                          images_per_identity=2, size=32).uri
    for evaluate, kind, shards in ((evaluate_fer, FERConfig, faces), (evaluate_attributes, AttributesConfig, faces),
                                   (evaluate_affect, AffectConfig, faces),
                                   (evaluate_landmarks, LandmarkConfig, points)):
        calls.clear()
        cfg = load_config(kind, data={"data": {"shards": shards, "image_size": 32},
                                      "backbone": {"source": "random:resnet18"},
                                      "run": {"storage_path": str(tmp_path / "runs")}})
        with pytest.raises(_Stop):
            evaluate(cfg)
        assert calls == ["init_ray", "datasets"], evaluate.__name__
