"""Forms generated from the config schemas: every method builds one, a form round-trips a config exactly, and a bad
value gives the CLI's one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from sdtune.config import METHOD_SCHEMAS, load_train_config, parse_config
from sdtune.core.errors import ConfigError
from sdtune.ui.forms import (
    build_components,
    config_to_values,
    default_values,
    element_id,
    form_fields,
    parse_form,
    values_to_data,
)

gr = pytest.importorskip("gradio")  # the `test` extra installs it; this only keeps a bare install importable

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every setting of a schema as a dotted key, found independently of the form code."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        inner = [info.annotation, *getattr(info.annotation, "__args__", ())]
        block = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if block is not None:
            keys |= leaf_keys(block, f"{prefix}{name}.")
            if type(None) in inner:
                keys.add(f"{prefix}{name}")  # an optional block has an "enable" checkbox
        elif f"{prefix}{name}" != "method":
            keys.add(f"{prefix}{name}")
    return keys


def build(method: str):
    fields = form_fields(METHOD_SCHEMAS[method])
    with gr.Blocks():
        components = build_components(fields, method)
    return fields, components


def through_widgets(components, values):
    """What the browser sends back for ``values``: each component's postprocess then preprocess."""
    return [c.preprocess(c.postprocess(v)) for c, v in zip(components, values, strict=True)]


@pytest.mark.parametrize("method", list(METHOD_SCHEMAS))
def test_every_method_schema_builds_its_form(method):
    schema = METHOD_SCHEMAS[method]
    fields, components = build(method)
    assert len(components) == len(fields)
    assert {f.key for f in fields} == leaf_keys(schema)  # every setting, nested blocks included, none twice
    assert len({f.key for f in fields}) == len(fields)
    for spec, component in zip(fields, components, strict=True):
        assert component.label == spec.key
        assert component.elem_id == element_id(method, spec.key)
    # help text is the field docstring
    by_key = dict(zip([f.key for f in fields], components, strict=True))
    assert "Total optimizer steps" in by_key["train.max_steps"].info
    assert schema.model_fields["name"].description.split()[0] in by_key["name"].info


def test_widgets_follow_the_types():
    fields, components = build("lora")
    c = dict(zip([f.key for f in fields], components, strict=True))
    assert isinstance(c["adapter"], gr.Dropdown)
    assert [v for _, v in c["adapter"].choices] == ["lora", "dora", "locon", "loha", "lokr", "oft", "boft"]
    assert c["adapter"].value == "lora"
    assert isinstance(c["train_unet"], gr.Checkbox) and c["train_unet"].value is True
    assert isinstance(c["rank"], gr.Number) and c["rank"].value == 8
    assert "≥ 1" in c["rank"].info and "≤ 1024" in c["rank"].info
    assert isinstance(c["optimizer.lr"], gr.Textbox)  # number or A1111 "rate:step" string
    assert isinstance(c["target_modules"], gr.Textbox) and c["target_modules"].lines > 1  # list[str]: one a line
    assert isinstance(c["alpha"], gr.Textbox) and c["alpha"].value == ""  # float | None: empty = None
    assert isinstance(c["dreambooth"], gr.Checkbox) and c["dreambooth"].value is False  # optional block
    # method defaults that differ from the shared block's are the form's defaults
    ti = {f.key: f.default for f in form_fields(METHOD_SCHEMAS["textual_inversion"])}
    assert ti["optimizer.lr"] == "0.005"


def rich_config(method: str, tmp_path):
    """A valid config of ``method`` with many settings away from their defaults."""
    data = {
        "method": method,
        "name": f"ui-{method}",
        "output_dir": str(tmp_path / "runs"),
        "data": {"path": "datasets/x", "resolution": 64, "batch_size": 3, "tag_dropout": 0.1, "shuffle_tags": True},
        "optimizer": {"lr": "0.005:100, 1e-3:1000, 1e-5", "betas": [0.8, 0.95], "eps": 1e-7},
        "train": {"max_steps": 321, "min_snr_gamma": 5.0, "seed": 7, "clip_grad": "norm"},
        "save": {"every_n_steps": 20, "dtype": "bf16"},
        "preview": {"every_n_steps": 20, "prompts": ["a [name] on blue", "a [name], red"], "negative_prompt": "x"},
    }
    extra = {
        "textual_inversion": {"token": "<t>", "num_vectors": 3, "init_text": "a red heart", "init_embedding": "e.pt"},
        "lora": {
            "adapter": "lokr",
            "rank": 4,
            "alpha": 2.0,
            "target_modules": ["to_q", "to_v"],
            "token": "<p>",
            "dreambooth": {"class_prompt": "a heart", "num_class_images": 7},
        },
        "hypernetwork": {"layer_structure": [1, 2, 2, 1], "activation": "swish", "sizes": [768, 320]},
        "dreambooth": {
            "instance_token": "sks",
            "instance_prompt": "a sks heart, [filewords]",
            "class_prompt": "a heart",
        },
        "finetune": {"ema": True, "ema_decay": 0.999},
    }
    data |= extra.get(method, {})
    if method == "lora":  # a schedule string and per-part rates exclude each other
        data["optimizer"]["lr"] = 2e-4
    return parse_config(data, METHOD_SCHEMAS[method])


@pytest.mark.parametrize("method", list(METHOD_SCHEMAS))
def test_a_filled_form_round_trips_to_the_same_config(method, tmp_path):
    cfg = rich_config(method, tmp_path)
    fields, components = build(method)
    values = through_widgets(components, config_to_values(fields, cfg))
    back = parse_form(METHOD_SCHEMAS[method], fields, values)
    assert back == cfg
    assert back.model_dump() == cfg.model_dump()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_round_trips_through_its_form(path):
    cfg = load_train_config(path)
    fields, components = build(cfg.method)
    values = through_widgets(components, config_to_values(fields, cfg))
    assert parse_form(METHOD_SCHEMAS[cfg.method], fields, values) == cfg


def test_a1111_rate_strings_stay_strings_and_numbers_become_numbers():
    schema = METHOD_SCHEMAS["textual_inversion"]
    fields = form_fields(schema)
    values = default_values(fields)
    index = {f.key: i for i, f in enumerate(fields)}
    values[index["name"]], values[index["token"]], values[index["data.path"]] = "n", "<t>", "d"
    values[index["optimizer.lr"]] = "0.005:200, 0.001"
    assert parse_form(schema, fields, values).optimizer.lr == "0.005:200, 0.001"
    values[index["optimizer.lr"]] = "1e-4"
    assert parse_form(schema, fields, values).optimizer.lr == pytest.approx(1e-4)
    values[index["data.resolution"]] = ""  # optional: empty is None
    assert parse_form(schema, fields, values).data.resolution is None
    values[index["data.resolution"]] = "128"
    assert parse_form(schema, fields, values).data.resolution == 128


def form_error(method: str, changes: dict) -> str:
    schema = METHOD_SCHEMAS[method]
    fields = form_fields(schema)
    values = default_values(fields)
    index = {f.key: i for i, f in enumerate(fields)}
    for key, value in {"name": "n", "token": "<t>", "data.path": "d", **changes}.items():
        values[index[key]] = value
    with pytest.raises(ConfigError) as caught:
        parse_form(schema, fields, values)
    return str(caught.value)


def cli_error(tmp_path, yaml_text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_train_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


BASE_YAML = "method: textual_inversion\nname: n\ntoken: <t>\ndata: {path: d}\n"


@pytest.mark.parametrize(
    ("changes", "yaml_extra"),
    [
        ({"optimizer.lr": "-0.001"}, "optimizer: {lr: -0.001}\n"),
        ({"optimizer.lr": "0.005:abc"}, "optimizer: {lr: '0.005:abc'}\n"),
        ({"train.max_steps": 0}, "train: {max_steps: 0}\n"),
        ({"train.max_steps": 2.5}, "train: {max_steps: 2.5}\n"),
        ({"token": "two words"}, ""),
        ({"data.resolution": "100"}, "data: {path: d, resolution: 100}\n"),
        ({"optimizer.betas": "0.9"}, "optimizer: {betas: [0.9]}\n"),
    ],
)
def test_invalid_values_give_the_cli_error(tmp_path, changes, yaml_extra):
    yaml_text = BASE_YAML + yaml_extra
    if "token" in changes:
        yaml_text = yaml_text.replace("token: <t>", f"token: {changes['token']}")
    assert form_error("textual_inversion", changes) == cli_error(tmp_path, yaml_text)


def test_empty_required_fields_are_reported_like_missing_keys(tmp_path):
    message = form_error("textual_inversion", {"name": "", "token": ""})
    assert message == cli_error(tmp_path, "method: textual_inversion\ndata: {path: d}\n")
    assert "name: required" in message and "token: required" in message


def test_the_cli_prints_the_same_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE_YAML + "optimizer: {lr: -0.001}\n")
    done = subprocess.run(
        [sys.executable, "-m", "sdtune.cli.main", "validate", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    shown = " ".join(done.stderr.split())
    assert form_error("textual_inversion", {"optimizer.lr": "-0.001"}) in shown


def test_a_disabled_optional_block_is_none_and_an_enabled_one_validates():
    schema = METHOD_SCHEMAS["lora"]
    fields = form_fields(schema)
    values = default_values(fields)
    index = {f.key: i for i, f in enumerate(fields)}
    values[index["name"]], values[index["data.path"]] = "n", "d"
    values[index["dreambooth.class_prompt"]] = "ignored while the block is off"
    assert values_to_data(fields, values, "lora")["dreambooth"] is None
    assert parse_form(schema, fields, values).dreambooth is None
    values[index["dreambooth"]] = True
    values[index["dreambooth.class_prompt"]] = "a heart"
    assert parse_form(schema, fields, values).dreambooth.class_prompt == "a heart"


def test_auto_or_number_preview_fields_show_auto_and_take_numbers():
    schema = METHOD_SCHEMAS["textual_inversion"]
    fields = form_fields(schema)
    values = default_values(fields)
    index = {f.key: i for i, f in enumerate(fields)}
    values[index["name"]], values[index["token"]], values[index["data.path"]] = "n", "<t>", "d"
    assert values[index["preview.steps"]] == "auto" and values[index["preview.num_prompts"]] == "auto"
    assert parse_form(schema, fields, values).preview.steps == "auto"
    values[index["preview.steps"]], values[index["preview.enabled"]] = "8", False
    cfg = parse_form(schema, fields, values)
    assert cfg.preview.steps == 8 and cfg.preview.enabled is False


def test_a_block_that_is_off_shows_its_defaults_so_every_choice_is_one_of_its_choices():
    """Loading a config without `eval:` must not hand a dropdown None (gradio refuses it and the load fails)."""
    from sdtune.config import parse_config
    from sdtune.config.methods import LoraConfig
    from sdtune.ui.forms import config_to_values, form_fields

    fields = form_fields(LoraConfig)
    cfg = parse_config({"method": "lora", "name": "x", "data": {"path": "d"}}, LoraConfig)
    shown = dict(zip((f.key for f in fields), config_to_values(fields, cfg), strict=True))
    assert shown["eval"] is False and shown["preservation"] is False
    for spec in fields:
        if spec.key.startswith(("eval.", "preservation.")):
            assert shown[spec.key] == spec.default, spec.key
            if spec.kind == "choice" and not spec.optional:
                assert shown[spec.key] in spec.choices, spec.key
