"""Typed configs: frozen dataclasses whose every field is checked where it is declared.

A config section is a class decorated with :func:`config`. Each field's type comes from its
annotation; its allowed values are declared next to it::

    @config("scaling")
    class ScalingConfig:
        cpus_per_worker: float = bounded(1.0, gt=0)
        max_failures: int = bounded(3, ge=-1, why="-1 retries forever")
        amp: str = one_of("off", "fp16", "bf16")

and :func:`check_fields` enforces all of it on construction, whether the values come from YAML
(:func:`from_dict`, errors name the full dotted key, e.g. ``pretrain.scaling.amp``) or from
Python (errors name the section's key, e.g. ``scaling.amp``). Cross-field rules stay in the
class's own ``__post_init__``, which runs after the field checks. Run names and other user-given
path components (:func:`path_component`) cannot leave their storage root; locations
(:func:`location`) are paths or URIs without control characters.

YAML 1.1 reads unquoted ``on``/``off``/``yes``/``no`` as booleans; a boolean given to a string
choice field is read back as the word the user meant when that word is one of the choices
(``amp: off`` is ``"off"``), and refused with a hint to quote it otherwise.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fra.errors import ConfigError

T = TypeVar("T")
RULE = "fra.rule"  # the dataclass field metadata key

# What YAML 1.1 turns into a boolean, by the boolean: the words a user may have meant.
_YAML11_WORDS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


# --------------------------------------------------------------------------------------
# Declaring fields
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What a field accepts beyond its type; numbers in tuples/lists are checked item by item."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple = ()
    path: str = ""  # "component": one path component under a root | "location": a path or URI
    required: bool = False  # a location that may not be empty
    why: str = ""  # appended to the error message

    def describe(self) -> str:
        parts = [f">= {self.ge}" if self.ge is not None else "", f"> {self.gt}" if self.gt is not None else "",
                 f"<= {self.le}" if self.le is not None else "", f"< {self.lt}" if self.lt is not None else ""]
        return " and ".join(p for p in parts if p)


REQUIRED: Any = object()  # as a default: the field has none and must be given


def _field(default: Any, rule: Rule) -> Any:
    if default is REQUIRED:
        return field(metadata={RULE: rule})
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={RULE: rule})
    return field(default=default, metadata={RULE: rule})


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, why: str = "") -> Any:
    """A numeric field (or tuple/list of numbers) whose values must lie in a range."""
    if ge is None and gt is None and le is None and lt is None:
        raise TypeError("bounded() needs at least one of ge, gt, le, lt")
    return _field(default, Rule(ge=ge, gt=gt, le=le, lt=lt, why=why))


def one_of(*choices: str, default: Any = MISSING, why: str = "") -> Any:
    """A string field that takes one of ``choices``; the default is the first unless given
    (``None`` is accepted too when the field is annotated optional)."""
    return _field(choices[0] if default is MISSING else default, Rule(choices=tuple(choices), why=why))


def path_component(default: str = REQUIRED, why: str = "") -> Any:
    """One path component joined under a storage root (a run name): no separators, not ``..``."""
    return _field(default, Rule(path="component", why=why))


def location(default: str = "", *, required: bool = False, why: str = "") -> Any:
    """A local path or a URI (``required``: not empty)."""
    return _field(default, Rule(path="location", required=required, why=why))


def config(section: str = ""):
    """Class decorator: a frozen dataclass whose fields are checked on every construction.

    Args:
        section: the dotted key of this section in its usual top-level config (``scaling``,
            ``model.swav``), used in errors when the class is built from Python.
    """
    def wrap(cls):
        own = cls.__dict__.get("__post_init__")

        def __post_init__(self) -> None:
            check_fields(self, section)
            if own is not None:
                own(self)

        __post_init__.__doc__ = own.__doc__ if own is not None else None
        cls.__post_init__ = __post_init__  # before dataclass(): it only calls a hook that exists
        out = dataclass(frozen=True)(cls)
        out.__config_section__ = section
        return out

    return wrap


# --------------------------------------------------------------------------------------
# Checking fields
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def rule_of(f: dataclasses.Field) -> Rule | None:
    return f.metadata.get(RULE)


def check_fields(obj: Any, section: str = "") -> None:
    """Type-check and range-check every field of a config instance in place (see the module docstring)."""
    hints = type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}" if section else f.name
        value = getattr(obj, f.name)
        checked = check_value(f, hints[f.name], value, key)
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


def check_value(f: dataclasses.Field, tp: Any, value: Any, key: str) -> Any:
    """One field's value, coerced to its annotation and checked against its rule."""
    rule, given = rule_of(f), value
    if rule is not None and rule.choices and isinstance(value, bool):
        value = _yaml11_word(value, rule.choices, key)
    if rule is not None and rule.path and isinstance(value, Path):
        value = str(value)
    value = _coerce(tp, value, key)
    if rule is not None and value is not None:
        _check_rule(rule, value, key, given)
    return value


def _yaml11_word(value: bool, choices: tuple, key: str) -> str:
    meant = [w for w in _YAML11_WORDS[value] if w in choices]
    if meant:
        return meant[0]
    words = "/".join(_YAML11_WORDS[value])
    raise ConfigError(f"{key} must be one of {list(choices)}, got the boolean {value}: YAML reads an unquoted "
                      f"{words} as a boolean; quote the word, e.g. {key.rsplit('.', 1)[-1]}: '{choices[0]}'")


def _check_rule(rule: Rule, value: Any, key: str, given: Any) -> None:
    why = f" ({rule.why})" if rule.why else ""
    if rule.choices and value not in rule.choices:
        raise ConfigError(f"{key} must be one of {list(rule.choices)}, got {value!r}{why}")
    if rule.path == "component":
        check_path_component(key, value, why)
    elif rule.path == "location":
        if rule.required and not value.strip():
            raise ConfigError(f"{key} must not be empty: give a local path or a URI{why}")
        if any(ord(c) < 32 for c in value):
            raise ConfigError(f"{key} must be a path or URI without control characters, got {value!r}{why}")
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for n in numbers:
        if not isinstance(n, (int, float)) or isinstance(n, bool):
            continue
        if math.isnan(n) or not ((rule.ge is None or n >= rule.ge) and (rule.gt is None or n > rule.gt)
                                 and (rule.le is None or n <= rule.le) and (rule.lt is None or n < rule.lt)):
            raise ConfigError(f"{key} must be {rule.describe()}, got {given!r}{why}")


def check_path_component(key: str, value: str, why: str = "") -> str:
    """Refuse a name that would leave the folder it is joined under (``..``, ``a/b``, ``/etc``, empty).

    Raises:
        ConfigError: naming ``key``.
    """
    if not isinstance(value, str) or value.strip() in ("", ".", "..") or any(c in value for c in "/\\") \
            or any(ord(c) < 32 for c in value):
        raise ConfigError(f"{key} must be a single folder name (no '/', '\\', '..', control characters, not "
                          f"empty) so it stays under its storage root, got {value!r}{why}")
    return value


def numeric_leaf(tp: Any) -> bool:
    """True for int/float annotations, optionally wrapped in Optional/Union/tuple/list."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType, tuple, list):
        inner = [a for a in args if a is not type(None) and a is not Ellipsis]
        return bool(inner) and all(numeric_leaf(a) for a in inner)
    return tp in (int, float)


# --------------------------------------------------------------------------------------
# dict <-> dataclass, overrides, YAML
# --------------------------------------------------------------------------------------
def from_dict(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build a (nested) frozen dataclass from a plain dict, rejecting unknown keys.

    Args:
        cls: the dataclass type.
        data: mapping of field name to value (nested dataclasses as nested mappings).
        path: dotted prefix used in error messages; "" = the class's own section (``optim``).
    """
    path = path or getattr(cls, "__config_section__", "")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {path + '.' if path else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint} (valid: {sorted(fields)})")
        kwargs[key] = check_value(fields[key], hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # e.g. a required field without default
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check/convert one value against a type annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} matches none of {tp}: {'; '.join(errors)}")
    if tp is Any:
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return value if isinstance(value, float) else float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """Plain-python (YAML-safe) view of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict copy."""
    out = copy.deepcopy(data)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from exc
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides=(), data: dict | None = None) -> T:
    """Load ``cls`` from a YAML file (or dict) plus ``--set`` overrides."""
    raw = load_yaml(path) if path is not None else dict(data or {})
    return from_dict(cls, apply_overrides(raw, list(overrides)))


def to_record(obj: Any) -> Any:
    """:func:`to_dict` redacted (:func:`fra.redaction.redact`): the view of a config that is written
    or logged (config.yaml, checkpoints, model cards, MLflow params). The live config is never
    redacted: a run opens its storage with it."""
    from fra.redaction import redact

    return redact(to_dict(obj))


def dump_yaml(obj: Any, path: str | Path) -> None:
    """Write a config (dataclass or dict) to YAML atomically, redacted (:func:`to_record`)."""
    from fra.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_record(obj), sort_keys=False))


def replace(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` that re-runs validation."""
    return dataclasses.replace(obj, **changes)
