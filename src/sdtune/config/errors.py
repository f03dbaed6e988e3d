"""Turn pydantic validation errors into one-line sdtune messages.

Each pydantic error becomes ``<dotted.loc>: <what is wrong> (got <input>); e.g. <example>``, for instance
``optimizer.lr: must be > 0 (got -0.001); e.g. 0.0001``; several errors are joined with ``"; "``. The
example is ``examples[0]`` of the field (see :mod:`sdtune.config.base`), found by walking the schema along
the error's location. The same walk drops the member tags pydantic puts into locations inside unions, so
users see ``optimizer.lr`` and not ``textual_inversion.optimizer.lr``.
"""

from __future__ import annotations

import difflib
import enum
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from pydantic import BaseModel, Discriminator, Tag, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from sdtune.core.errors import ConfigError

#: Errors shown before the rest are summarised as "and N more".
MAX_ERRORS = 5

_UNKNOWN = object()  # the walk lost track of the type: no examples, no field names from here on

_MAPPING = "expected a mapping (key: value lines)"
_EXPECTED = {
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), "expected an integer"),
    **dict.fromkeys(("float_type", "float_parsing", "decimal_type", "decimal_parsing"), "expected a number"),
    **dict.fromkeys(("bool_type", "bool_parsing"), "expected true or false"),
    **dict.fromkeys(("string_type", "bytes_type"), "expected a string"),
    **dict.fromkeys(("list_type", "tuple_type", "set_type", "frozen_set_type", "iterable_type"), "expected a list"),
    **dict.fromkeys(("dict_type", "mapping_type", "model_type", "model_attributes_type", "dataclass_type"), _MAPPING),
    "path_type": "expected a file or folder path",
    "none_required": "must be null",
    "finite_number": "must be a finite number",
    "int_parsing_size": "is too large",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
# Errors whose message already says everything; the input and an example would only add noise.
_NO_GOT = set("missing extra_forbidden union_tag_invalid union_tag_not_found value_error assertion_error".split())
_NO_EXAMPLE = _NO_GOT - {"missing"} | {"literal_error", "enum"}


@dataclass
class _Location:
    """Where an error's ``loc`` points in the schema."""

    parts: list[str | int] = field(default_factory=list)  # the loc as users see it (union tags dropped)
    annotation: Any = _UNKNOWN  # the type found at the end of the loc
    discriminator: Any = None  # discriminator of that type, when it is a discriminated union
    field: FieldInfo | None = None  # the model field the loc ends at, if it ends exactly at one
    parent: type[BaseModel] | None = None  # the model holding the last loc element (for unknown keys)


def format_validation_error(err: ValidationError, model: Any = None) -> str:
    """Return the one-line message for ``err``.

    ``model`` is what was validated: a ``BaseModel`` subclass, a ``TypeAdapter`` or a type annotation such
    as an ``Annotated`` discriminated union. Without it the message lacks examples and key suggestions.
    """
    root = _root_type(model)
    found: list[tuple[str, str, str]] = []
    for error in err.errors(include_url=False):
        path, body, tail = _format_one(error, root)
        for i, (seen_path, seen_body, seen_tail) in enumerate(found):
            if (seen_path, seen_body, seen_tail) == (path, body, tail):
                break
            # A plain union (e.g. ``float | str``) reports one type error per member: say it once.
            if (
                (seen_path, seen_tail) == (path, tail)
                and body.startswith("expected ")
                and seen_body.startswith("expected ")
            ):
                found[i] = (path, f"{seen_body} or {body.removeprefix('expected ')}", tail)
                break
        else:
            found.append((path, body, tail))
    messages = [f"{path}: {body}{tail}" if path else f"{body}{tail}" for path, body, tail in found]
    if len(messages) > MAX_ERRORS:
        rest = len(messages) - MAX_ERRORS
        messages = [*messages[:MAX_ERRORS], f"and {rest} more"]
    return "; ".join(messages)


def config_error(err: ValidationError, model: Any = None) -> ConfigError:
    """Return a :class:`ConfigError` carrying :func:`format_validation_error`'s message."""
    return ConfigError(format_validation_error(err, model))


def _root_type(model: Any) -> Any:
    if model is None:
        return _UNKNOWN
    if isinstance(model, TypeAdapter):
        # TypeAdapter keeps the annotation it was built from only privately; without it we lose examples.
        return getattr(model, "_type", _UNKNOWN)
    return model


def _format_one(error: Mapping[str, Any], root: Any) -> tuple[str, str, str]:
    """Return (dotted location, what is wrong, " (got ...); e.g. ..." tail) for one pydantic error."""
    kind: str = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    where = _locate(root, error["loc"])
    parts = where.parts

    if kind in ("union_tag_invalid", "union_tag_not_found"):
        disc = str(ctx.get("discriminator", "")).strip("'\"") or "type"
        parts = [*parts, disc]
        tags = ctx.get("expected_tags") or _union_tags(where.annotation, where.discriminator)
        choose = f"; choose one of {tags}" if tags else ""
        if kind == "union_tag_invalid":
            return _dotted(parts), f"unknown {disc} {ctx.get('tag')!r}{choose}", ""
        return _dotted(parts), f"required{choose}", ""

    if kind == "extra_forbidden":
        return _dotted(parts), "unknown key" + _suggest(parts[-1] if parts else "", where.parent), ""

    if kind == "missing":
        text = "required"
        choices = _choices(where.annotation)
        if choices:
            text += f"; choose one of {choices}"
    elif kind in ("value_error", "assertion_error"):
        text = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif kind in ("literal_error", "enum"):
        text = f"must be one of {_choices(where.annotation) or _or_to_commas(ctx.get('expected', ''))}"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        text = f"must be {_BOUNDS[kind]} {_number(bound)}"
    elif kind == "multiple_of":
        text = f"must be a multiple of {_number(ctx.get('multiple_of'))}"
    elif kind in ("too_short", "too_long"):
        limit = ctx.get("min_length" if kind == "too_short" else "max_length")
        text = f"must have at {'least' if kind == 'too_short' else 'most'} {limit} item{_s(limit)}"
    elif kind in ("string_too_short", "string_too_long"):
        limit = ctx.get("min_length" if kind == "string_too_short" else "max_length")
        text = f"must be at {'least' if kind == 'string_too_short' else 'most'} {limit} character{_s(limit)}"
    elif kind == "string_pattern_mismatch":
        text = f"must match the pattern {ctx.get('pattern')!r}"
    elif kind in _EXPECTED:
        text = _EXPECTED[kind]
    else:
        msg = str(error["msg"])
        text = "must be" + msg[len("Input should be") :] if msg.startswith("Input should be") else msg

    tail = ""
    if kind not in _NO_GOT:
        tail += f" (got {_show(error.get('input'))})"
    if kind not in _NO_EXAMPLE and where.field is not None and where.field.examples:
        tail += f"; e.g. {_example(where.field.examples[0])}"
    return _dotted(parts), text, tail


def _dotted(parts: Sequence[str | int]) -> str:
    """``optimizer.lr``, ``datasets[0].path``; empty for errors about the whole config."""
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _locate(root: Any, loc: Sequence[str | int]) -> _Location:
    """Walk the schema from ``root`` along ``loc``, dropping union member tags from the visible path."""
    where = _Location(annotation=root)
    for element in loc:
        ann, disc = _unwrap(where.annotation)
        if disc is None:
            disc = where.discriminator
        where.discriminator = None
        if isinstance(disc, str) and str(element) in map(str, _tag_values(ann, disc)):
            continue  # a one-member discriminated union: pydantic still puts the member's tag in the loc
        members = _union_members(ann)
        if members is not None and len(members) > 1:
            # Inside a union pydantic prefixes the loc with the member's tag or type name: hide it.
            # Keep ``field``: for a plain union such as ``float | str`` the field's example still applies.
            where.annotation = _pick_member(members, element, disc)
            continue
        where.parts.append(element)
        where.field = None
        origin = typing.get_origin(ann)
        args = typing.get_args(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            where.parent = ann
            found = _model_field(ann, element)
            where.field = found
            where.annotation = found.annotation if found is not None else _UNKNOWN
            where.discriminator = found.discriminator if found is not None else None
        elif origin in (list, tuple, set, frozenset) or (
            isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str
        ):
            where.annotation = args[0] if args else _UNKNOWN
        elif origin is dict or (isinstance(origin, type) and issubclass(origin, Mapping)):
            where.annotation = args[1] if len(args) == 2 else _UNKNOWN
        else:
            where.annotation = _UNKNOWN
    where.annotation, disc = _unwrap(where.annotation)
    where.discriminator = disc if disc is not None else where.discriminator
    return where


def _unwrap(ann: Any) -> tuple[Any, Any]:
    """Strip ``Annotated`` (keeping a discriminator found in it) and ``None`` from ``Optional``."""
    disc = None
    while typing.get_origin(ann) is typing.Annotated:
        ann, *meta = typing.get_args(ann)
        for item in meta:
            if isinstance(item, FieldInfo) and item.discriminator is not None:
                disc = item.discriminator
            elif isinstance(item, Discriminator):
                disc = item.discriminator
    members = _union_members(ann)
    if members is not None and len(members) == 1:
        return _unwrap(members[0])[0], disc
    return ann, disc


def _union_members(ann: Any) -> list[Any] | None:
    """The non-None members of a union, or None when ``ann`` is not a union."""
    if typing.get_origin(ann) not in (Union, types.UnionType):
        return None
    return [member for member in typing.get_args(ann) if member is not type(None)]


def _pick_member(members: list[Any], element: str | int, disc: Any) -> Any:
    """The union member that a pydantic loc element (a tag or a type name) designates."""
    for member in members:
        meta = typing.get_args(member)[1:] if typing.get_origin(member) is typing.Annotated else ()
        if any(isinstance(item, Tag) and item.tag == element for item in meta):
            return member
    for member in members:
        inner = _unwrap(member)[0]
        if isinstance(disc, str) and str(element) in map(str, _tag_values(inner, disc)):
            return member
        origin = typing.get_origin(inner) or inner
        if (
            getattr(inner, "__name__", None) == element
            or getattr(origin, "__name__", None) == str(element).split("[", 1)[0]
        ):
            return member
    return _UNKNOWN


def _tag_values(ann: Any, disc: str) -> tuple[Any, ...]:
    """The discriminator values a model in a discriminated union accepts."""
    if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
        return ()
    found = _model_field(ann, disc)
    tag_type = _unwrap(found.annotation)[0] if found is not None else None
    return typing.get_args(tag_type) if typing.get_origin(tag_type) is Literal else ()


def _union_tags(ann: Any, disc: Any) -> str:
    members = _union_members(ann) or []
    if not isinstance(disc, str):
        return ""
    return ", ".join(repr(tag) for member in members for tag in _tag_values(_unwrap(member)[0], disc))


def _model_field(model: type[BaseModel], name: str | int) -> FieldInfo | None:
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias, info.validation_alias):
            return info
    return None


def _suggest(key: str | int, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    names = [info.alias or name for name, info in model.model_fields.items()]
    close = difflib.get_close_matches(str(key), names, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; allowed keys: {', '.join(repr(name) for name in names)}"


def _choices(ann: Any) -> str:
    if typing.get_origin(ann) is Literal:
        return ", ".join(repr(value) for value in typing.get_args(ann))
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return ", ".join(repr(member.value) for member in ann)
    return ""


def _or_to_commas(expected: str) -> str:
    # pydantic writes "'a', 'b' or 'c'"; sdtune lists choices uniformly as "'a', 'b', 'c'".
    head, sep, tail = str(expected).rpartition(" or ")
    return f"{head}, {tail}" if sep else str(expected)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _s(count: Any) -> str:
    return "" if count == 1 else "s"


def _show(value: Any, limit: int = 60) -> str:
    """The input as a user wrote it in YAML, shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _example(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | None | list | dict):
        return json.dumps(value)
    return str(value)
