"""A cheap in-process FER proxy: frozen features + multinomial logistic regression.

:func:`linear_probe_features` embeds images once with the frozen backbone (eval mode, eval
transform = resize only, global average pool), standardises the features, and fits an
L2-regularised logistic regression with full-batch L-BFGS. No Ray, no augmentation, seconds
instead of an epoch loop: a ranking signal for Ray Tune, not a replacement for
:func:`fra.evaluation.fer.evaluate_fer`.

Honesty: by default the probe is scored on a ``holdout`` carved from the training split (by
path hash, like ``data.val_fraction``), never on the test set, so using it to select trials does
not leak test labels. Pass ``holdout=0`` to score on ``test_split`` instead (reporting only).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fra.evaluation.metrics import confusion_matrix, macro_f1, mean_class_accuracy, top1

log = logging.getLogger(__name__)

VGGFACE2 = ((0.5231, 0.4044, 0.3489), (0.2536, 0.2194, 0.2070))


@dataclass
class ProbeResult:
    """Scores of the probe (percent) on the evaluation rows (holdout or test)."""

    top1: float
    mean_class_acc: float
    macro_f1: float
    train_top1: float
    confusion: list[list[int]]
    num_train: int
    num_eval: int
    eval_on: str  # "holdout" or the test split name
    feature_dim: int
    seconds: float
    extra: dict = field(default_factory=dict)


def feature_extractor(backbone: Any, arch: str = "") -> nn.Module:
    """A torchvision ResNet with ``fc = Identity`` from any backbone source (module, dict, path, URI)."""
    from fra.checkpoint import build_torchvision_resnet, load_backbone_into
    from fra.evaluation.backbones import resolve_backbone

    src = resolve_backbone(backbone, arch)
    model = build_torchvision_resnet(src.arch)
    load_backbone_into(model, src.state_dict, src.spec)
    model.fc = nn.Identity()
    return model.eval()


@torch.no_grad()
def embed(model: nn.Module, batches, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, D), labels int64 (N,)) of ``{"image": uint8 (B,3,S,S), "label"}`` batches."""
    from fra.engine import Normalizer

    norm = Normalizer(mean, std)
    feats, labels = [], []
    for batch in batches:
        feats.append(model(norm(batch["image"])).float().numpy())
        labels.append(np.asarray(batch["label"], np.int64))
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(feats), np.concatenate(labels)


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = 1e-3, max_iter: int = 100):
    """Multinomial logistic regression on standardised features, full-batch L-BFGS.

    Returns:
        a function ``predict(features (M, D)) -> classes (M,)``.
    """
    mu, sd = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-6
    xt = torch.from_numpy((x - mu) / sd).double()
    yt = torch.from_numpy(y)
    lin = nn.Linear(x.shape[1], num_classes).double()
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(xt), yt) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)

    @torch.no_grad()
    def predict(f: np.ndarray) -> np.ndarray:
        return lin(torch.from_numpy((f - mu) / sd).double()).argmax(1).numpy()

    return predict


def linear_probe_features(backbone: Any, shards: str | None = None, *, train_split: str = "train",
                          test_split: str = "", train_data: Any = None, test_data: Any = None,
                          holdout: float = 0.2, image_size: int = 112, mean=VGGFACE2[0], std=VGGFACE2[1],
                          max_rows: int = 0, batch_size: int = 64, l2: float = 1e-3, max_iter: int = 100,
                          arch: str = "", num_classes: int = 0, num_threads: int = 0) -> ProbeResult:
    """Frozen-feature logistic-regression probe (see the module docstring).

    Args:
        backbone: anything :func:`~fra.evaluation.backbones.resolve_backbone` accepts.
        shards: a FER shard root; its ``train_split`` (and ``test_split``) are read in process.
        train_data / test_data: instead of shards, anything :class:`fra.data.local.LocalFERLoader`
            accepts (a ``SyntheticFaces`` spec, ``(spec, split)``, a list of images with labels as
            ``(images, labels)``).
        holdout: fraction of the training rows scored (by path hash / index); 0 = score on test.
        image_size: eval resize side.
        mean, std: normalisation.
        max_rows: cap on rows read per split (0 = all); shards are shuffled when written.
        l2: weight of the squared-weight penalty.
        max_iter: L-BFGS iterations.
        num_classes: needed with ``train_data`` when labels may miss a class (default: max + 1).
    """
    t0 = time.perf_counter()
    model = feature_extractor(backbone, arch)
    if shards is not None:
        from fra.data.manifest import read_manifest

        manifest = read_manifest(shards)
        num_classes = num_classes or len(manifest.classes)
        x, y, keys = embed_shards(model, manifest, train_split, image_size, mean, std, max_rows, batch_size)
        test = (lambda: embed_shards(model, manifest, test_split or "test", image_size, mean, std, max_rows,
                                     batch_size)[:2])
    else:
        x, y = embed(model, _local(train_data, image_size, batch_size, num_threads, max_rows), mean, std)
        keys = np.random.default_rng(0).integers(0, 2**62, len(y), dtype=np.int64)  # seeded stand-in for path hashes
        def test():
            return embed(model, _local(test_data, image_size, batch_size, num_threads, max_rows), mean, std)
    num_classes = num_classes or int(y.max()) + 1
    if holdout:
        from fra.evaluation.data import is_val

        val = is_val(keys, holdout)
        if val.all() or not val.any():
            raise ValueError(f"holdout={holdout} leaves no training or no evaluation rows ({len(y)} rows)")
        (xe, ye), x, y, on = (x[val], y[val]), x[~val], y[~val], "holdout"
    else:
        if shards is None and test_data is None:
            raise ValueError("holdout=0 needs test rows (test_split with shards, or test_data)")
        (xe, ye), on = test(), test_split or "test"
    predict = fit_logistic(x, y, num_classes, l2, max_iter)
    conf = confusion_matrix(predict(xe), ye, num_classes)
    train_acc = top1(confusion_matrix(predict(x), y, num_classes))
    out = ProbeResult(top1(conf), mean_class_accuracy(conf), macro_f1(conf), train_acc, conf.tolist(), len(y),
                      len(ye), on, int(x.shape[1]), time.perf_counter() - t0)
    log.info("linear probe (features): %s top-1 %.2f%% (train %.2f%%), %d/%d rows, %.1f s", on, out.top1,
             train_acc, out.num_train, out.num_eval, out.seconds)
    return out


def embed_shards(model, manifest, split: str, image_size: int, mean, std, max_rows: int, batch_size: int):
    """Read a split's shards in this process (pyarrow), eval-transform, embed; also returns row keys."""
    import pyarrow.parquet as pq

    from fra.data.augment import FERTransform
    from fra.data.decode import CorruptImageError, decode_pil
    from fra.data.readers.base import resolve
    from fra.data.stream import row_key

    transform = FERTransform(image_size, train=False)
    feats, labels, keys, pending = [], [], [], ([], [])

    def flush():
        if pending[0]:
            f, lab = embed(model, [{"image": torch.from_numpy(np.stack(pending[0]).transpose(0, 3, 1, 2).copy()),
                                    "label": np.asarray(pending[1])}], mean, std)
            feats.append(f)
            labels.append(lab)
            pending[0].clear()
            pending[1].clear()

    for uri in manifest.shard_uris(split):
        fs, path = resolve(uri)
        for rb in pq.ParquetFile(fs.open_input_file(path)).iter_batches(256, columns=["image", "label", "path"]):
            for raw, label, p in zip(*(rb.column(c).to_pylist() for c in ("image", "label", "path"))):
                if max_rows and len(keys) >= max_rows:
                    break
                try:
                    pending[0].append(transform(decode_pil(raw)))
                except CorruptImageError:
                    continue
                pending[1].append(label)
                keys.append(row_key(p))
                if len(pending[0]) >= batch_size:
                    flush()
    flush()
    if not labels:
        raise ValueError(f"{manifest.uri}: split {split!r} has no readable rows")
    return np.concatenate(feats), np.concatenate(labels), np.asarray(keys, np.int64)


def _local(data, image_size: int, batch_size: int, num_threads: int, max_rows: int):
    from fra.data.local import LocalFERLoader

    if isinstance(data, tuple) and len(data) == 2 and not hasattr(data[0], "sample"):
        images, labels = data
        images, labels = (images[:max_rows], labels[:max_rows]) if max_rows else (images, labels)
        return LocalFERLoader(list(images), batch_size, image_size, train=False, labels=list(labels),
                              num_threads=num_threads)
    return LocalFERLoader(data, batch_size, image_size, train=False, num_threads=num_threads)
