"""Training forms generated from the config schemas: no hand-written form per method.

:func:`form_fields` walks a schema's ``model_fields`` (nested blocks such as ``data``, ``optimizer`` and
``train`` included) and describes one input per setting: its dotted name (the label), the field docstring (the
help text), the widget kind and the default. :func:`build_components` turns that into gradio components;
:func:`values_to_data` turns what the form holds back into the mapping a YAML file would hold, and
:func:`parse_form` validates it with :func:`sdtune.config.parse_config`, so a bad value gives the same one-line
error as ``sdtune train``. :func:`config_to_values` fills a form from a validated config (load YAML, and the
round trip the tests check: config -> form -> config is the identity).

Widgets by type: ``Literal`` -> dropdown, ``bool`` -> checkbox, ``int``/``float`` -> number (``X | None``: text,
empty = None), ``str`` -> text, ``list[str]`` -> text with one item per line, lists/tuples of numbers -> text
``1, 2, 1``, ``float | str`` (A1111 learning-rate strings) -> text read back as a number when it is one,
``X | None`` -> empty means None, an optional block -> a checkbox that enables it; anything else -> text holding
YAML, read with the safe loader.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from sdtune.config import parse_config
from sdtune.config.methods import RunBase

Kind = Literal["choice", "bool", "int", "float", "text", "lines", "numbers", "rate", "yaml", "enable"]

# Blocks shown open; the rest start folded (their defaults suit most runs).
OPEN_GROUPS = ("run", "model", "data", "train")
_GROUP_ORDER = ("run", "<method>", "model", "data", "train", "optimizer", "schedule", "save", "preview")


@dataclass(frozen=True)
class FieldSpec:
    """One input of a generated form."""

    key: str  # dotted path in the config, also the label: "optimizer.lr"
    kind: Kind
    help: str  # the field's docstring (+ allowed range)
    default: Any  # the form value shown for a new config
    group: str  # "run", the method name (its own fields), or the block: "data", "optimizer", ...
    required: bool = False  # no default: left empty, the key is left out and validation says it is required
    optional: bool = False  # None is allowed: an empty input means None
    choices: tuple[Any, ...] = ()
    item_type: type = float  # for "numbers": int or float items
    placeholder: str = ""


# -- schema -> fields ---------------------------------------------------------------------------------------


def form_fields(schema: type[RunBase]) -> list[FieldSpec]:
    """The inputs of ``schema``'s form in display order (``method`` itself is chosen outside the form)."""
    method = schema.model_fields["method"].annotation.__args__[0] if "method" in schema.model_fields else ""
    specs = _walk(schema, "", None, method)
    order = [method if g == "<method>" else g for g in _GROUP_ORDER]
    rank = {g: i for i, g in enumerate(order)}
    seen = {g: i for i, g in enumerate(dict.fromkeys(s.group for s in specs))}
    groups = sorted(seen, key=lambda g: rank.get(g, len(order) + seen[g]))
    return [s for g in groups for s in specs if s.group == g]


def _walk(model: type[BaseModel], prefix: str, instance: Any, method: str) -> list[FieldSpec]:
    specs: list[FieldSpec] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        if key == "method":
            continue
        annotation, optional = _unwrap_optional(info.annotation)
        required = info.is_required() and instance is None
        default = getattr(instance, name) if instance is not None else info.get_default(call_default_factory=True)
        if required:
            default = None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            block_default = default if isinstance(default, BaseModel) else None
            if optional:  # an optional block: a checkbox turns it on
                doc = info.description or ""
                specs.append(
                    FieldSpec(key, "enable", f"Use the {key} block. {doc}".strip(), block_default is not None, key)
                )
            specs += _walk(annotation, key + ".", block_default, method)
            continue
        group = prefix.split(".")[0] if prefix else ("run" if name in RunBase.model_fields else method)
        kind, choices, item_type = _kind_of(annotation)
        examples = info.examples or []
        placeholder = _to_form(kind, examples[0], optional) if examples and kind in ("text", "rate", "lines") else ""
        specs.append(
            FieldSpec(
                key=key,
                kind=kind,
                help=_help(info, required),
                default=None if required else _to_form(kind, default, optional),
                group=group,
                required=required,
                optional=optional,
                choices=choices,
                item_type=item_type,
                placeholder=str(placeholder or ""),
            )
        )
    return specs


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True  # noqa: UP007
    return annotation, False


def _kind_of(annotation: Any) -> tuple[Kind, tuple[Any, ...], type]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "choice", args, float
    if annotation is bool:
        return "bool", (), float
    if annotation is int:
        return "int", (), int
    if annotation is float:
        return "float", (), float
    if annotation is str:
        return "text", (), float
    if origin in (typing.Union, types.UnionType) and set(args) == {float, str}:
        return "rate", (), float
    if origin is list and args == (str,):
        return "lines", (), float
    if origin in (list, tuple) and args and all(a in (int, float) or a is Ellipsis for a in args):
        return "numbers", (), int if all(a in (int, Ellipsis) for a in args) else float
    return "yaml", (), float


def _help(info: Any, required: bool) -> str:
    bounds = []
    for m in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("multiple_of", "multiple of")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr)}")
    text = " ".join((info.description or "").split())
    if bounds:
        text += f" ({', '.join(bounds)})"
    if required:
        text = "Required. " + text
    return text


# -- values <-> config --------------------------------------------------------------------------------------


def _number_text(value: float | int) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _to_form(kind: Kind, value: Any, optional: bool) -> Any:
    """A config value as the widget holds it."""
    if kind == "enable":
        return value is not None
    if kind in ("int", "float") and optional:  # a text box: gradio's number widget sends 0 for "empty"
        return "" if value is None else _number_text(value)
    if value is None:
        return None if kind in ("int", "float", "choice") else ("" if kind != "bool" else False)
    if kind == "lines":
        return "\n".join(str(v) for v in value)
    if kind == "numbers":
        return ", ".join(_number_text(v) for v in value)
    if kind == "rate":
        return value if isinstance(value, str) else _number_text(value)
    if kind == "yaml":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)  # a scalar such as `auto` or 8 (`int | "auto"` fields) as typed, without YAML's `...`
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return value


def _from_form(spec: FieldSpec, value: Any) -> tuple[bool, Any]:
    """(include, config value) for what the widget holds; include False leaves the key out (required, empty)."""
    empty = value is None or (isinstance(value, str) and not value.strip())
    if spec.kind in ("bool", "enable"):
        return True, bool(value)
    if empty and spec.kind != "lines":
        if spec.required:
            return False, None
        if spec.optional:
            return True, None
        if spec.kind in ("text",):
            return True, "" if value is None else value
    if spec.kind in ("int", "float") and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return True, value.strip()  # not a number: the schema's own message says what is expected
    if spec.kind == "int":
        return True, int(value) if isinstance(value, float) and value.is_integer() else value
    if spec.kind in ("float", "choice", "text"):
        return True, value
    text = str(value)
    if spec.kind == "lines":
        return True, [line.strip() for line in text.splitlines() if line.strip()]
    if spec.kind == "numbers":
        parts = [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]
        try:
            return True, [spec.item_type(float(p)) if spec.item_type is int else float(p) for p in parts]
        except ValueError:
            return True, text  # not numbers: the schema's own message says what is expected
    if spec.kind == "rate":
        try:
            return True, float(text)
        except ValueError:
            return True, text.strip()  # an A1111 schedule string, checked by the schema
    try:  # yaml
        return True, yaml.safe_load(text)
    except yaml.YAMLError:
        return True, text


def values_to_data(fields: list[FieldSpec], values: list[Any], method: str) -> dict[str, Any]:
    """The nested mapping (as in a YAML file) that a form's ``values`` stand for."""
    if len(values) != len(fields):
        raise ValueError(f"{len(values)} form values for {len(fields)} fields")
    data: dict[str, Any] = {"method": method}
    disabled: list[str] = []
    for spec, value in zip(fields, values, strict=True):
        if any(spec.key.startswith(block + ".") for block in disabled):
            continue
        include, converted = _from_form(spec, value)
        if spec.kind == "enable" and not converted:
            disabled.append(spec.key)
            converted = None
        elif spec.kind == "enable":
            continue  # its fields fill the block
        if not include:
            continue
        node = data
        *parents, last = spec.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = converted
    return data


def parse_form(schema: type[RunBase], fields: list[FieldSpec], values: list[Any]) -> RunBase:
    """Validate a form: the same checks and one-line :class:`ConfigError` messages as ``sdtune train``."""
    return parse_config(values_to_data(fields, values, _method_of(schema)), schema)


def config_to_values(fields: list[FieldSpec], cfg: RunBase) -> list[Any]:
    """The form values that show ``cfg``."""
    out = []
    for spec in fields:
        value: Any = cfg
        for part in spec.key.split("."):
            if value is None:  # an optional block that is off (eval: None): its fields show their defaults
                break
            value = getattr(value, part)
        else:
            out.append(_to_form(spec.kind, value, spec.optional))
            continue
        out.append(spec.default)
    return out


def default_values(fields: list[FieldSpec]) -> list[Any]:
    return [spec.default for spec in fields]


def _method_of(schema: type[RunBase]) -> str:
    return schema.model_fields["method"].annotation.__args__[0]


# -- fields -> gradio ---------------------------------------------------------------------------------------


def element_id(method: str, key: str) -> str:
    """The HTML id of a field's component: ``textual_inversion--train-max_steps``."""
    return f"{method}--{key.replace('.', '-')}"


def build_components(fields: list[FieldSpec], method: str, columns: int = 2) -> list[Any]:
    """Create the form's gradio components (inside the current ``gr.Blocks`` context), grouped in accordions.

    Returns them in the order of ``fields``. No value limits are put on the widgets: every check is the
    schema's, so the form reports exactly what the CLI would.
    """
    import gradio as gr

    components: list[Any] = []
    for group in dict.fromkeys(f.group for f in fields):
        items = [f for f in fields if f.group == group]
        title = f"{group} settings" if group != method else f"{method} settings"
        with gr.Accordion(title, open=group in OPEN_GROUPS or group == method, elem_id=f"{method}--group-{group}"):
            for start in range(0, len(items), columns):
                with gr.Row(equal_height=False):
                    for spec in items[start : start + columns]:
                        components.append(_component(gr, spec, method))
    return components


def _component(gr: Any, spec: FieldSpec, method: str) -> Any:
    common = {"label": spec.key, "info": spec.help, "elem_id": element_id(method, spec.key)}
    if spec.kind == "choice":
        choices = [(str(c), c) for c in spec.choices]
        return gr.Dropdown(choices=choices, value=spec.default, **common)
    if spec.kind in ("bool", "enable"):
        return gr.Checkbox(value=bool(spec.default), **common)
    if spec.kind in ("int", "float") and not spec.optional:
        # precision None for ints too: gradio would round 2.5 to 2 silently; the schema says "whole number"
        return gr.Number(value=spec.default, precision=None, **common)
    lines = 3 if spec.kind == "lines" else 1
    return gr.Textbox(value=spec.default or "", lines=lines, max_lines=12, placeholder=spec.placeholder, **common)
