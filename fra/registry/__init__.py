"""MLflow model registry for pretrained backbones: register, load, list and show.

The package: :mod:`~fra.registry.connection` (URI, retries, reachability, shared types),
:mod:`~fra.registry.exports` (reading an export), :mod:`~fra.registry.registration`,
:mod:`~fra.registry.loading` and :mod:`~fra.registry.listing`; every public name is importable
from ``fra.registry``. Promotion (the ``champion`` alias, its JSON history and rollback) lives in
:mod:`fra.registry_promotion`, above these modules, and is re-exported here lazily.

**What gets registered.** The backbone is a torchvision ResNet trunk (``fc`` replaced by
``Identity``) mapping float32 images ``(B, 3, H, W)`` to features ``(B, C)``. It is logged as an
MLflow PyTorch model in the **pt2** format (``torch.export``) with the batch *and* spatial
dimensions dynamic: the signature says ``(-1, 3, -1, -1)`` and the input example has batch 2, so
the exporter keeps those dimensions symbolic instead of specialising them (a batch-1 example
would freeze the batch, RAY_NOTES §5).

Why pt2 and not pickle: a pt2 archive is a graph plus tensors, so loading it runs no pickled code
(MLflow checks this when ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``) and needs neither fra's nor
torchvision's classes. The costs are a few seconds of ``torch.export`` per registration and one
export guard: the final 32x down-sampled map must be larger than 1x1, so H, W >= 33 px. Training
code never needs the pt2 graph. The model also carries ``extra_files/backbone.pt`` (tensors only,
loaded with ``weights_only``) and ``extra_files/model_card.json``, and :func:`load_registered`
builds a torchvision ResNet from those.

The model's ``requirements.txt`` pins only ``torch`` (plus the ``mlflow`` MLflow adds itself):
loading the pt2 graph needs nothing else.

**No half-registered versions.** :func:`register_backbone` checks that the tracking server
answers before creating anything. The version is created with ``fra.status=pending`` and flipped
to ``ready`` as the last step. If anything fails after the model was logged, the version is
deleted (or, if even that fails, left ``pending``/``failed``), a registered model created by this
call is removed again, and the run is marked FAILED. Promotion and :func:`load_registered` refuse
versions whose status is not ``ready``, so a failed registration can never become champion.
Transient failures (connection errors, HTTP 5xx/429, a locked sqlite file) are retried with
exponential back-off; version creation is retried idempotently via a ``fra.registration_id`` tag.
"""
from __future__ import annotations

from fra.registry.connection import (CARD_FIELDS, CARD_TAG_PREFIX, CHAMPION, DATASET_TAG, EXAMPLE_SIDE, FAILED,
                                     METRIC_TAG_PREFIX, MODEL_NAME_IN_RUN, PENDING, PROTOCOL_TAG, READY,
                                     REGISTRATION_TAG, REGISTRY_EXPERIMENT, STATUS_TAG, ModelVersionInfo, RegistryError,
                                     _fluent_uri, call, champion_version, check_reachable, client, get_version,
                                     is_transient, resolve_uri)
from fra.registry.exports import EXPORT_CANDIDATES, _read_export, fer_metrics_from_results
from fra.registry.listing import list_models, show
from fra.registry.loading import load_registered
from fra.registry.registration import register_backbone

_PROMOTION_API = ("PromotionDecision", "promote", "read_history", "rollback")

__all__ = ["CARD_FIELDS", "CARD_TAG_PREFIX", "CHAMPION", "DATASET_TAG", "EXAMPLE_SIDE", "EXPORT_CANDIDATES", "FAILED",
           "METRIC_TAG_PREFIX", "MODEL_NAME_IN_RUN", "PENDING", "PROTOCOL_TAG", "READY", "REGISTRATION_TAG",
           "REGISTRY_EXPERIMENT", "STATUS_TAG", "ModelVersionInfo", "RegistryError", "_fluent_uri", "_read_export",
           "call", "champion_version", "check_reachable", "client", "fer_metrics_from_results", "get_version",
           "is_transient", "list_models", "load_registered", "register_backbone", "resolve_uri", "show",
           *_PROMOTION_API]


def __getattr__(attr: str):
    # Promotion (fra.registry_promotion) sits above this package and imports its modules; it is
    # re-exported lazily so that callers only need ``fra.registry``.
    if attr in _PROMOTION_API:
        from fra import registry_promotion

        return getattr(registry_promotion, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
