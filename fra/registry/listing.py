"""What `fra registry list` and `fra registry show` print: registered models, versions, history."""
from __future__ import annotations

from fra.registry.connection import (CARD_TAG_PREFIX, CHAMPION, DATASET_TAG, METRIC_TAG_PREFIX, PROTOCOL_TAG,
                                     STATUS_TAG, RegistryError, call, check_reachable, client, resolve_uri)


def list_models(tracking_uri: str | None = None) -> list[dict]:
    """One row per registered model: name, latest version, champion, description."""
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    mlc = client(uri)
    rows = []
    from fra.registry_lock import is_lock

    for rm in call("search registered models", lambda: mlc.search_registered_models(max_results=1000)):
        if is_lock(rm.name):  # a promotion in progress holds it (fra.registry_lock)
            continue
        aliases = {k: int(v) for k, v in (rm.aliases or {}).items()}
        latest = max((int(v.version) for v in rm.latest_versions or []), default=None)
        rows.append({"name": rm.name, "latest_version": latest, "champion": aliases.get(CHAMPION),
                     "aliases": aliases, "description": rm.description or ""})
    return rows


def show(name: str, tracking_uri: str | None = None) -> dict:
    """A registered model: aliases, every version (status, metrics, protocol, fingerprint), history."""
    from mlflow.exceptions import MlflowException

    from fra.registry_promotion import read_history

    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    mlc = client(uri)
    try:
        rm = call("get registered model", lambda: mlc.get_registered_model(name))
    except MlflowException as exc:
        raise RegistryError(f"no registered model {name!r}: {str(exc).splitlines()[0][:200]}") from exc
    versions = []
    for mv in sorted(call("search versions", lambda: mlc.search_model_versions(f"name = '{name}'")),
                     key=lambda m: int(m.version)):
        t = mv.tags or {}
        versions.append({"version": int(mv.version), "status": t.get(STATUS_TAG, ""), "run_id": mv.run_id,
                         "eval_protocol": t.get(PROTOCOL_TAG, ""), "dataset_fingerprint": t.get(DATASET_TAG, ""),
                         "metrics": {k.removeprefix(METRIC_TAG_PREFIX): float(v) for k, v in t.items()
                                     if k.startswith(METRIC_TAG_PREFIX)},
                         "architecture": t.get(CARD_TAG_PREFIX + "architecture", ""),
                         "created": mv.creation_timestamp})
    return {"name": rm.name, "description": rm.description or "",
            "aliases": {k: int(v) for k, v in (rm.aliases or {}).items()},
            "versions": versions, "history": read_history(mlc, name)}
