"""Evaluation while training (``eval:``): eval.jsonl, the best step in output/, early stop, resume, ``sdtune eval``,
and bad input before training. Small runs on the built-in model (the world scorer) with a few cheap images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from tests.methods.run_configs import sdtune_in_process

from sdtune.config import parse_config
from sdtune.config.methods import METHOD_SCHEMAS
from sdtune.core.errors import ConfigError, SdtuneError
from sdtune.core.events import EventBus, StepEnd
from sdtune.methods.run import run, run_dir_of
from sdtune.tools.evaluate_files import evaluate_file, evaluate_run
from sdtune.world import write_concept_dataset

EVAL = {
    "every_n_steps": 2,
    "prompts": ["a red star on a green background", "a blue star on a purple background"],
    "prior_prompts": ["a red circle on a blue background", "a yellow square on a green background"],
    "steps": 2,
}


@pytest.fixture(scope="module")
def star_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("star")
    write_concept_dataset("star", folder, n=6)
    return folder


def lora_config(tmp_path: Path, data: Path, name: str = "ev", max_steps: int = 6, **extra) -> dict:
    config = {
        "method": "lora",
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "adapter": "locon",
        "targets": "all",
        "rank": 4,
        "model": {"base": "builtin"},
        "data": {"path": str(data), "batch_size": 2},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "constant"},
        "train": {"max_steps": max_steps},
        "save": {"keep_last": 1},
        "preview": {"enabled": False},
        "eval": dict(EVAL),
    }
    for key, value in extra.items():
        config[key] = config[key] | value if isinstance(value, dict) and key in config else value
    return config


def train(config: dict, resume: bool = False, bus: EventBus | None = None):
    cfg = parse_config(config, METHOD_SCHEMAS[config["method"]])
    outputs = run(cfg, resume=resume, console=Console(quiet=True), progress=False, bus=bus)
    return outputs, run_dir_of(cfg)


def figures(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("seconds", "step")}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_evaluations_are_recorded_and_output_holds_the_best_step(tmp_path, star_data):
    outputs, rundir = train(lora_config(tmp_path, star_data))
    rows = rundir.evaluations()
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert all({"fidelity", "adherence", "prior", "drift", "score", "seconds"} <= set(r) for r in rows)
    assert rows[0]["drift"] == 0.0  # the reference is the base model's own images
    for r in rows:
        assert r["score"] == pytest.approx(r["fidelity"] - 0.5 * r["drift"], abs=0.011)
        assert (rundir.eval_dir / f"step-{r['step']}.png").is_file()
    report = json.loads(rundir.report_path.read_text())
    later = [r for r in rows if r["step"] > 0]
    best = max(later, key=lambda r: r["score"])  # max() keeps the first of equal figures, as the selection does
    assert report["best_step"] == best["step"] and report["selected_by"] == "score"
    assert report["best"] == {"step": best["step"]} | figures(best)
    assert report["last"] == {"step": 6} | figures(rows[-1]) and report["last_step"] == 6
    assert report["evaluations"] == 4 and report["eval_seconds"] > 0
    assert (rundir.root / "report.html").is_file()

    # output/ is the best step's export (its checkpoint kept past keep_last: 1), the last step's in output/last/
    exported = rundir.checkpoint(best["step"]).path / "export" / "ev.safetensors"
    assert outputs == [rundir.output / "ev.safetensors"]
    best_file, last_file = tensors(outputs[0]), rundir.output / "last" / "ev.safetensors"
    assert best_file.keys() == tensors(exported).keys()
    assert all(torch.equal(best_file[k], tensors(exported)[k]) for k in best_file)
    if best["step"] != 6:
        last = tensors(last_file)
        assert any(not torch.equal(best_file[k], last[k]) for k in best_file)  # a different step's weights
    else:
        assert not last_file.exists()

    # the exported files, applied as users apply them, score the best step's figures again
    assert evaluate_run(rundir.root) == figures(best)


def test_early_stop_ends_the_run_and_keeps_its_best(tmp_path, star_data):
    config = lora_config(tmp_path, star_data, max_steps=20, eval=EVAL | {"patience": 1, "min_delta": 100.0})
    _, rundir = train(config)
    rows = rundir.evaluations()
    # step 2 sets the mark; step 4 cannot rise by 100 points: one evaluation without improvement ends the run
    assert [r["step"] for r in rows] == [0, 2, 4]
    report = json.loads(rundir.report_path.read_text())
    assert report["last_step"] == 4 and report["stopped"].startswith("early stop: 1 evaluations without score")
    assert "early stop" in rundir.events_path.read_text()
    assert [c.step for c in rundir.list_checkpoints()][-1] == 4


def test_a_resumed_run_evaluates_exactly_as_an_uninterrupted_one(tmp_path, star_data):
    every_step = {"save": {"every_n_steps": 1, "keep_last": 10}}
    _, whole = train(lora_config(tmp_path, star_data, name="whole", **every_step))
    config = lora_config(tmp_path, star_data, name="split", **every_step)

    def stop_at_3(event):
        if isinstance(event, StepEnd) and event.step == 3:
            run_dir_of(parse_config(config, METHOD_SCHEMAS["lora"])).request_stop()

    bus = EventBus()
    bus.subscribe(stop_at_3)
    _, split = train(config, bus=bus)
    assert [r["step"] for r in split.evaluations()] == [0, 2, 3]  # a stopped run's last step is evaluated too
    # as if killed after evaluating step 4 and before its checkpoint: resume from step 2, so the rows of steps 3
    # and 4 are past the checkpoint and must not survive
    split.append_eval({"step": 4, "score": 1e9})
    shutil.rmtree(split.checkpoints / "step-3")
    _, split = train(config, resume=True)
    assert [figures(r) for r in split.evaluations()] == [figures(r) for r in whole.evaluations()]
    assert [r["step"] for r in split.evaluations()] == [0, 2, 4, 6]
    whole_report, split_report = (json.loads(d.report_path.read_text()) for d in (whole, split))
    assert split_report["best_step"] == whole_report["best_step"]
    assert split_report["best"] == whole_report["best"]


def test_evaluate_file_scores_a_lora_file_against_the_base(tmp_path, star_data, monkeypatch, capsys):
    outputs, rundir = train(lora_config(tmp_path, star_data, max_steps=2))
    # `sdtune eval RUN --json F`: the run's own evaluation, one table, the figures as JSON
    figures_file = tmp_path / "f.json"
    code, out, err = sdtune_in_process(monkeypatch, capsys, "eval", str(rundir.root), "--json", str(figures_file))
    assert code == 0, err
    assert json.loads(figures_file.read_text()) == evaluate_run(rundir.root)
    assert "fidelity" in out and "drift" in out
    code, _, err = sdtune_in_process(monkeypatch, capsys, "eval", str(outputs[0]), "--prompt", "a cat")
    assert code == 2 and err.count("\n") == 1 and "eval.prompts: 'a cat' names no shape" in err
    from sdtune.config.blocks import EvalConfig

    e = EvalConfig(**EVAL)
    by_file = evaluate_file(outputs[0], "builtin", e)
    assert by_file == evaluate_run(rundir.root)  # the base's reference images made now = the run's saved ones
    assert by_file["score"] == pytest.approx(by_file["fidelity"] - 0.5 * by_file["drift"], abs=0.011)
    with pytest.raises(ConfigError, match="eval.concept: no concept prompts"):
        evaluate_file(outputs[0], "builtin", EvalConfig())
    with pytest.raises(SdtuneError, match="no such file"):
        evaluate_file(tmp_path / "missing.safetensors", "builtin", e)


# -- bad input: one line before training, never a crash mid-run ------------------------------------------------------


def test_every_n_steps_beyond_the_run_is_a_config_error(tmp_path, star_data):
    config = lora_config(tmp_path, star_data, max_steps=6, eval=EVAL | {"every_n_steps": 50})
    with pytest.raises(ConfigError, match=r"eval.every_n_steps: 50 is more than train.max_steps \(6\)"):
        parse_config(config, METHOD_SCHEMAS["lora"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clip_model": "/nowhere/clip", "scorer": "clip"}, "eval.clip_model: /nowhere/clip does not exist"),
        ({"prompts": [], "concept": None}, "eval.concept: no concept prompts"),
        ({"prompts": ["a photo of a cat"]}, "eval.prompts: 'a photo of a cat' names no shape"),
        ({"prior_prompts": ["something else"]}, "eval.prior_prompts: 'something else' names no shape"),
    ],
)
def test_bad_evaluation_settings_stop_before_the_first_step(tmp_path, star_data, change, message):
    config = lora_config(tmp_path, star_data, eval=EVAL | change)
    with pytest.raises(ConfigError, match=message) as caught:
        train(config)
    assert "\n" not in str(caught.value)
    rundir = run_dir_of(parse_config(config, METHOD_SCHEMAS["lora"]))
    assert rundir.list_checkpoints() == [] and not rundir.eval_path.exists()


def test_a_model_without_a_scorer_trains_without_evaluation_and_says_so(tmp_path, tiny_checkpoint, image_folder):
    config = {
        "method": "lora",
        "name": "plain",
        "output_dir": str(tmp_path / "runs"),
        "model": {"base": str(tiny_checkpoint("sd1"))},
        "data": {"path": str(image_folder), "resolution": 16, "batch_size": 2},
        "train": {"max_steps": 2},
        "preview": {"enabled": False},
        "eval": {"every_n_steps": 1},
    }
    cfg = parse_config(config, METHOD_SCHEMAS["lora"])
    console = Console(record=True, width=400)
    outputs = run(cfg, console=console, progress=False)
    assert outputs and not run_dir_of(cfg).eval_path.exists()
    said = console.export_text()
    assert said.count("eval: no scorer for this model") == 1 and "eval.clip_model" in said


def test_evaluating_never_changes_what_trains(tmp_path, star_data):
    _, evaluated = train(lora_config(tmp_path, star_data, name="with", max_steps=4))
    config = lora_config(tmp_path, star_data, name="without", max_steps=4)
    config.pop("eval")
    _, plain = train(config)
    a = load_file(str(evaluated.checkpoint(4).path / "trainable.safetensors"))
    b = load_file(str(plain.checkpoint(4).path / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not plain.eval_path.exists() and not plain.report_path.exists()


@pytest.mark.parametrize("method", ["textual_inversion", "finetune"])
def test_embeddings_and_whole_models_are_evaluated_as_files_and_as_runs(tmp_path, method):
    """An embedding file (its word as prompts use it) and a whole checkpoint score as their run's output does."""
    data = tmp_path / "heart"
    token = "<teal-heart>" if method == "textual_inversion" else None
    write_concept_dataset("teal_heart", data, n=4, token=token)
    e = {"every_n_steps": 1, "concept": "teal_heart", "steps": 2, "num_prior_prompts": 2}
    config = {
        "method": method,
        "name": method,
        "output_dir": str(tmp_path / "runs"),
        "model": {"base": "builtin"},
        "data": {"path": str(data), "batch_size": 2},
        "train": {"max_steps": 1},
        "preview": {"enabled": False},
        "eval": e,
    } | ({"token": token, "init_text": "heart"} if token else {})
    outputs, rundir = train(config)
    from sdtune.config.blocks import EvalConfig

    rows = rundir.evaluations()
    assert [r["step"] for r in rows] == [0, 1]
    assert ("drift" in rows[0]) is (method != "textual_inversion")  # a new word changes no prompt without it
    file = next(p for p in outputs if p.suffix == ".safetensors")
    by_file = evaluate_file(file, "builtin", EvalConfig(**e), word=token)
    assert by_file == evaluate_run(rundir.root) == figures(rows[-1])


@pytest.mark.parametrize(
    ("word", "trigger", "concept", "first"),
    [
        (None, False, "star", "a green star on a red background"),  # plain words
        ("<teal-heart>", False, "teal_heart", "a <teal-heart> on a red background"),  # a new token: the concept
        ("sks", True, "teal_heart", "a sks heart on a red background"),  # a trigger before the class word
        ("sks", True, "star", "a green sks star on a red background"),
    ],
)
def test_world_prompts_name_the_concept_as_the_run_does(word, trigger, concept, first):
    from sdtune.config.blocks import EvalConfig
    from sdtune.methods.evaluation import Scorers, Target, build_evaluation

    target = Target("lora", word, 64, trigger=trigger)
    evaluation = build_evaluation(EvalConfig(concept=concept), Scorers("world"), target)
    assert evaluation.concept[0] == first
    expect = evaluation.scorer.concept[0]
    assert (expect.shape, expect.bg) == (concept.split("_")[-1], "red")
    assert len(evaluation.prior) == 16


def test_a_file_lycoris_wrote_scores_as_lycoris_applies_it(tmp_path, monkeypatch):
    """`sdtune eval` on another tool's file: a LoCon made and saved by the lycoris-lora package itself, applied by
    sdtune as users apply it, scores what the same images score with LyCORIS' own modules hooked into the model."""
    lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="pip install lycoris-lora==4.1.3")
    from tests.formats.test_lora_keys import lycoris_apply, named_view

    from sdtune.config.blocks import EvalConfig
    from sdtune.methods.evaluation import Scorers, Target, build_evaluation
    from sdtune.models.loading import load_model

    model = load_model("builtin")
    encoder = model.text_encoders[0]
    te = encoder if hasattr(encoder, "text_model") else named_view({"text_model": encoder})
    # its "full" preset targets diffusers' time embedding both by class and by name (4.1.3 asserts on that)
    full = lycoris_kohya.PRESET["full"]
    monkeypatch.setitem(lycoris_kohya.PRESET, "full", dict(full, unet_target_name=[]))
    saved = list(lycoris_kohya.LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME)
    try:
        network = lycoris_kohya.create_network(1.0, 4, 4.0, None, te, model.unet, algo="locon", conv_dim=4)
    finally:
        lycoris_kohya.LycorisNetworkKohya.apply_preset({"unet_target_name": saved})
    network.apply_to(te, model.unet, apply_text_encoder=True, apply_unet=True)  # its modules become parameters
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():  # LyCORIS starts with zero up-weights: give it something to apply
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    path = tmp_path / "lycoris-locon.safetensors"
    network.save_weights(str(path), torch.float32, {})

    e = EvalConfig(**EVAL)
    figures = evaluate_file(path, "builtin", e)
    evaluation = build_evaluation(e, Scorers("world"), Target("file", None, 64, trigger=True))
    reference = evaluation.scorer.reference(evaluation.images(load_model("builtin")).prior)
    hooked = load_model("builtin")
    lycoris_apply(hooked, load_file(str(path)))
    expected = evaluation.figures(evaluation.images(hooked), reference)
    assert figures == expected
    assert figures["drift"] > 0  # the file changed what the base draws: the comparison is not of two base models
