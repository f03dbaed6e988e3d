"""Read config files, apply ``--set key=value`` overrides, validate, and write configs back.

The flow is ``load_yaml`` -> ``apply_overrides`` -> ``parse_config``: overrides are merged into the raw
mapping *before* validation, so an override is checked exactly like the same value written in the file.
Every failure is a one-line :class:`ConfigError` naming the file or the override.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from sdtune.config.errors import config_error
from sdtune.core.errors import ConfigError

OVERRIDE_SYNTAX = "--set optimizer.lr=1e-4"

# YAML 1.1 (what PyYAML implements) reads ``1e-4`` as a *string*: its floats need a dot and a signed
# exponent. Learning rates are written that way all the time, so plain scalars in scientific notation are
# read as floats, as YAML 1.2 does. Quoted scalars ('1e-4') stay strings.
_SCIENTIFIC = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"
_NULL_WORDS = {"", "~", "null", "Null", "NULL"}


# YAML 1.1 also reads yes/no/on/off (any case) as booleans, so ``mixed_precision: no`` -- the documented value --
# arrived as ``false``. As in YAML 1.2, only true/false are booleans; ``no`` stays the string "no", and a bool field
# still takes it, since pydantic reads "no"/"off"/"yes"/"on" as booleans.
_BOOL_TAG = "tag:yaml.org,2002:bool"
_BOOL_1_2 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float and only true/false as booleans (YAML 1.2's rules)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings such as ``'1e-4'``, which :class:`_Loader` would read as floats (and still
    quotes ``'no'``, so other YAML 1.1 readers get the string too)."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(_FLOAT_TAG, _SCIENTIFIC, list("-+0123456789."))
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_1_2, list("tTfF"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file whose top level is a mapping; raise :class:`ConfigError` otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a folder, expected a YAML file: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected UTF-8 YAML)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # safe: _Loader derives from SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML{_yaml_where(exc)}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected settings such as 'method: lora'")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of settings (key: value lines), not a {_kind(data)}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override set.

    The value is read as YAML (1.2's rules, as in files), so ``1e-4`` is a float, ``true`` a bool, ``no`` a
    string, ``[a, b]`` a list and ``null`` (or an empty value) is None; quote it to force a string
    (``--set token="'123'"``). Missing intermediate mappings are created. ``data`` itself is not modified.
    """
    result = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = str(override).partition("=")
        keys = [part.strip() for part in key.split(".")]
        if not sep or not all(keys):
            raise ConfigError(f"invalid override {override!r}: expected key=value, e.g. {OVERRIDE_SYNTAX}")
        node = result
        for depth, part in enumerate(keys[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(
                    f"invalid override {override!r}: {where!r} is a {_kind(child)}, not a mapping, "
                    f"so it has no key {keys[depth + 1]!r}"
                )
            node = child
        node[keys[-1]] = _parse_value(raw)
    return result


def parse_config(data: Any, schema: Any) -> Any:
    """Validate ``data`` against ``schema``; raise a one-line :class:`ConfigError` if it is invalid.

    ``schema`` is a ``BaseModel`` subclass, a ``TypeAdapter``, or a type annotation such as an
    ``Annotated`` discriminated union of the training methods.
    """
    try:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(data)
        adapter = schema if isinstance(schema, TypeAdapter) else TypeAdapter(schema)
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise config_error(exc, schema) from exc


def load_config(path: str | Path, overrides: Iterable[str] = (), *, schema: Any) -> Any:
    """Load ``path``, apply ``overrides`` and validate against ``schema`` (see :func:`parse_config`).

    Validation errors are prefixed with the file name: ``run.yaml: optimizer.lr: must be > 0 ...``.
    """
    data = apply_overrides(load_yaml(path), overrides)
    try:
        return parse_config(data, schema)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def dump_yaml(config: BaseModel) -> str:
    """Write a validated config as YAML, keys in declaration order; loading it back gives an equal config."""
    return yaml.dump(
        config.model_dump(mode="json"),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
    )


def _parse_value(raw: str) -> Any:
    """Read an override value as YAML, falling back to the raw text when it is not valid YAML."""
    text = raw.strip()
    try:
        value = yaml.load(text, Loader=_Loader)  # safe: _Loader derives from SafeLoader
    except yaml.YAMLError:
        # e.g. "a: b: c" -- not YAML, but a fine string; validation reports it if a string is wrong here.
        return text
    if value is None and text not in _NULL_WORDS:
        return text  # "#ff0000" reads as an empty YAML document (a comment); the user meant the text
    return value


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}" if problem else where


def _kind(value: Any) -> str:
    names = {list: "list", str: "string", dict: "mapping", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type(value).__name__)
