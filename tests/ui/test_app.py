"""The app builds every page and keeps its security defaults (loopback only, roots only)."""

from __future__ import annotations

import inspect
import warnings

import pytest

from sdtune.cli.main import ui_cmd
from sdtune.config import METHOD_SCHEMAS
from sdtune.ui.app import App, build_app
from sdtune.ui.paths import PathRefused, Roots

gr = pytest.importorskip("gradio")


def test_the_app_builds_with_a_form_per_method(tmp_path):
    app = App(Roots([tmp_path]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        demo = build_app(app)
    # gradio reads each handler's annotations to pass event data (gr.SelectData): none may be missing
    assert not [str(w.message) for w in caught if "arguments for function" in str(w.message)]
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    for method in METHOD_SCHEMAS:
        assert f"form-{method}" in ids
        assert f"{method}--data-path" in ids
    for needed in ("dataset-path", "dataset-save-caption", "train-start", "runs-stop", "runs-loss", "results-files"):
        assert needed in ids
    for needed in ("dataset-alpha-mask", "dataset-captioner-model", "dataset-mask-note", "results-strength"):
        assert needed in ids
    for needed in ("runs-eval", "results-evaluation", "results-report"):  # evaluation plot, figures, report.html
        assert needed in ids
    assert app.runs_dir == (tmp_path / "runs").resolve() and app.runs_dir.is_dir()


def test_the_server_binds_loopback_by_default():
    host = inspect.signature(ui_cmd).parameters["host"].default
    assert host.default == "127.0.0.1"


def test_runs_and_the_runs_folder_must_be_inside_the_roots(tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(PathRefused, match="--runs"):
        App(Roots([tmp_path / "root"]), runs_dir=tmp_path / "elsewhere")
    app = App(Roots([tmp_path / "root"]))
    with pytest.raises(PathRefused, match="run: "):
        app.run_root(str(tmp_path))
    with pytest.raises(PathRefused):
        app.run_root("../")


def test_the_train_page_estimates_the_form_as_it_changes(tmp_path, tiny_model):
    from image_folders import write_image_folder
    from sdtune.models.loading import save_model
    from sdtune.ui.forms import config_to_values

    app = App(Roots([tmp_path]))
    demo = build_app(app)
    assert "train-estimate" in {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    base = save_model(tiny_model("sd1"), tmp_path / "tiny.safetensors")
    folder = write_image_folder(tmp_path / "images")
    cfg = METHOD_SCHEMAS["lora"].model_validate(
        {"method": "lora", "name": "x", "model": {"base": str(base)}, "data": {"path": str(folder)}}
    )
    values = []
    for method, fields in app.fields.items():
        values += config_to_values(fields, cfg) if method == "lora" else [None] * len(fields)
    text = app.form_estimate("lora", tuple(values))
    assert text.startswith("estimate: lora on sd1 at 32px") and "time per step" in text  # the tiny model's size
    empty = app.form_estimate("lora", tuple([None] * len(values)))
    assert empty.startswith("estimate: not yet (") and "\n" not in empty
