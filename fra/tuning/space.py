"""Search spaces written as data, checked against :class:`fra.config.PretrainConfig`.

A space is a mapping from a parameter to one distribution, e.g.::

    num_proto: {choice: [4, 8, 16]}
    teacher_temp: {loguniform: [0.02, 0.1]}
    loss_weight: {uniform: [0.3, 0.7]}
    model.hidden_dim: {grid: [32, 64]}

Parameters are the familiar FRA names (:data:`ALIASES`) or full dotted paths into the pretrain
config. :func:`parse_space` rejects unknown names (with a suggestion), malformed ranges, values
of the wrong type and values the config itself refuses (it builds the config at every end point
and choice), all before Ray is touched; :func:`to_tune` turns the checked space into Ray Tune
domains and :func:`apply_params` / :func:`with_values` put sampled values into a config.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from fra.config import PretrainConfig, from_dict
from fra.errors import ConfigError

T = TypeVar("T")

ALIASES = {
    "num_proto": "model.num_proto",
    "teacher_temp": "model.teacher_temp",
    "student_temp": "model.student_temp",
    "loss_weight": "model.loss_weight",
    "loss_w_cluster": "model.loss_w_cluster",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "batch_size": "optim.batch_size",
}
# distribution -> number of arguments (None = a non-empty list of values)
DISTRIBUTIONS = {"choice": None, "grid": None, "uniform": 2, "loguniform": 2, "quniform": 3,
                 "qloguniform": 3, "randint": 2, "lograndint": 2}
_CONTINUOUS = ("uniform", "loguniform", "quniform", "qloguniform")


@dataclass(frozen=True)
class Param:
    """One searched parameter.

    Attributes:
        name: the key as written in the space (an alias or a dotted path).
        path: the dotted path into :class:`PretrainConfig` (the key Tune sees).
        kind: the distribution (a key of :data:`DISTRIBUTIONS`).
        args: its arguments (values for choice / grid, bounds [and q] otherwise).
    """

    name: str
    path: str
    kind: str
    args: tuple

    def candidates(self) -> list:
        """Values the config must accept: every choice, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind in ("randint", "lograndint"):
            return [self.args[0], self.args[1] - 1]  # Tune's upper bound is exclusive
        return [self.args[0], self.args[1]]


def leaf_types(cls: type = PretrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a nested config dataclass: ``{"model.num_proto": int, ...}``."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(leaf_types(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def resolve_name(name: str, leaves: dict[str, Any] | None = None) -> str:
    """An alias or dotted path -> the dotted path; unknown names raise with a suggestion."""
    leaves = leaf_types() if leaves is None else leaves
    path = ALIASES.get(name, name)
    if path in leaves:
        return path
    known = sorted(ALIASES) + sorted(leaves)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close:  # a bare field name such as "hidden_dim" -> its full path
        close = [p for p in leaves if p.rsplit(".", 1)[-1] == name][:1]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"search space: unknown parameter {name!r}{hint} "
                      f"(use one of {sorted(ALIASES)} or a dotted path such as 'model.hidden_dim')")


def parse_space(space: dict | None, base: PretrainConfig | dict | None = None) -> list[Param]:
    """Check a search space and return its parameters (in the order written).

    Args:
        space: mapping parameter -> ``{distribution: args}``.
        base: the pretrain config the values are applied to (default: :class:`PretrainConfig`).

    Raises:
        ConfigError: unknown parameter, duplicate target, malformed distribution, a value of the
            wrong type, or a value that the pretrain config rejects.
    """
    if not isinstance(space, dict) or not space:
        raise ConfigError("search space must be a non-empty mapping parameter -> {distribution: args}")
    leaves = leaf_types()
    base = base if dataclasses.is_dataclass(base) else copy.deepcopy(base or {})
    params, seen = [], {}
    for name, spec in _flat(space).items():
        path = resolve_name(name, leaves)
        if path in seen:
            raise ConfigError(f"search space: {name!r} and {seen[path]!r} both set {path}")
        seen[path] = name
        param = _parse_one(name, path, spec, leaves[path])
        for value in param.candidates():
            try:
                apply_params(base, {path: value})
            except ConfigError as exc:
                raise ConfigError(f"search space: {name}={value!r} is not a valid config value: {exc}") from exc
        params.append(param)
    return params


def _flat(space: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections (``model: {hidden_dim: {grid: [...]}}``, what ``--set space.model.x=...``
    produces) -> dotted names; a mapping whose values are all mappings is a section."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _parse_one(name: str, path: str, spec: Any, tp: Any) -> Param:
    where = f"search space: {name}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where} must be a mapping with exactly one distribution, e.g. "
                          f"{{choice: [4, 8]}} or {{uniform: [0.3, 0.7]}}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown distribution {kind!r}{hint} (valid: {sorted(DISTRIBUTIONS)})")
    arity = DISTRIBUTIONS[kind]
    if not isinstance(args, (list, tuple)) or not args or (arity is not None and len(args) != arity):
        shape = "a non-empty list of values" if arity is None else f"a list of {arity} numbers"
        raise ConfigError(f"{where}: {kind} takes {shape}, got {args!r}")
    args = tuple(args)
    if arity is None:
        if len(set(map(repr, args))) != len(args):
            raise ConfigError(f"{where}: {kind} values must be distinct, got {list(args)}")
        return Param(name, path, kind, args)
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args):
        raise ConfigError(f"{where}: {kind} bounds must be finite numbers, got {list(args)}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs lower < upper, got [{lo}, {hi}]")
    if kind.startswith(("log", "qlog")) and lo <= 0:
        raise ConfigError(f"{where}: {kind} needs a positive lower bound, got {lo}")
    if len(args) == 3 and not args[2] > 0:
        raise ConfigError(f"{where}: {kind} step q must be > 0, got {args[2]}")
    integer = tp is int
    if kind in _CONTINUOUS and integer:
        raise ConfigError(f"{where}: {path} is an integer; use randint, lograndint, choice or grid, not {kind}")
    if kind in ("randint", "lograndint") and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"{where}: {kind} bounds must be integers, got [{lo}, {hi}]")
    if not integer and tp is not float and tp is not typing.Any:
        raise ConfigError(f"{where}: {path} is not numeric; use choice or grid")
    return Param(name, path, kind, args)


def to_tune(params: list[Param]) -> dict[str, Any]:
    """Ray Tune ``param_space`` keyed by dotted path."""
    from ray import tune

    build = {"choice": lambda a: tune.choice(list(a)), "grid": lambda a: tune.grid_search(list(a)),
             "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
             "quniform": lambda a: tune.quniform(*a), "qloguniform": lambda a: tune.qloguniform(*a),
             "randint": lambda a: tune.randint(*a), "lograndint": lambda a: tune.lograndint(*a)}
    return {p.path: build[p.kind](p.args) for p in params}


def plain(value: Any) -> Any:
    """numpy scalars (Tune samples them) -> Python scalars, so the config type checks accept them."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def set_paths(data: dict, values: dict[str, Any]) -> dict:
    """A deep copy of a nested mapping with dotted-path values set (no YAML parsing of values)."""
    out = copy.deepcopy(data)
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = plain(value)
    return out


def with_values(cfg: T, values: dict[str, Any]) -> T:
    """A copy of a typed config with dotted-path values set, validated like a loaded one.

    Stays typed (no mapping round trip): each changed section is rebuilt with
    ``dataclasses.replace``, whose construction runs the section's field checks and cross-field
    rules; a path into a ``dict`` field (e.g. ``data.augment.erase_p``) sets a key of that dict.
    """
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"with_values takes a typed config, got {type(cfg).__name__}")
    for path, value in values.items():
        cfg = _set_path(cfg, path.split("."), plain(value), path)
    return cfg


def _set_path(node: Any, parts: list[str], value: Any, path: str) -> Any:
    head, rest = parts[0], parts[1:]
    if isinstance(node, dict):
        out = dict(node)
        out[head] = _set_path(out.get(head, {}), rest, value, path) if rest else value
        return out
    names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    if head not in names:
        close = difflib.get_close_matches(head, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {path!r}{hint}")
    new = _set_path(getattr(node, head), rest, value, path) if rest else value
    return dataclasses.replace(node, **{head: new})


def apply_params(base: dict | PretrainConfig, params: dict[str, Any]) -> PretrainConfig:
    """A validated :class:`PretrainConfig`: ``base`` (a typed config, or a nested mapping) with
    dotted-path values set."""
    if dataclasses.is_dataclass(base):
        return with_values(base, params)
    return from_dict(PretrainConfig, set_paths(base, params))


__all__ = ["ALIASES", "DISTRIBUTIONS", "Param", "leaf_types", "resolve_name", "parse_space", "to_tune",
           "set_paths", "with_values", "apply_params", "plain"]
