"""``sdtune estimate``: what a run will cost, from configs and headers only, checked against what the run's own
setup builds (trainable counts, stored bytes) and against what a run records."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tests.methods.method_cases import case_config
from tests.methods.test_precision import PRECISION_CASES, _config
from typer.testing import CliRunner

from sdtune.cli.main import app
from sdtune.core.errors import TrainingError
from sdtune.methods import estimate as estimate_module
from sdtune.methods import run as run_module
from sdtune.methods import setup_function as method_setup  # (pytest reserves the name setup_function)
from sdtune.methods.estimate import estimate, summary_lines
from sdtune.methods.run import run

FULL = ("dreambooth", "finetune")


def _full_config(tmp_path, base, folder, case, **train):
    return case_config(tmp_path, base, folder, case, preview={"enabled": False}, **({"max_steps": 1} | train))


@pytest.mark.parametrize("case", [*PRECISION_CASES, *FULL])
def test_trainable_count_and_frozen_bytes_match_what_the_run_builds(
    tmp_path, tiny_checkpoint, image_folder, case, bf16_accelerator
):
    base = tiny_checkpoint("sd1")
    cfg = (_full_config if case in FULL else _config)(tmp_path, base, image_folder, case)
    expected = estimate(cfg, "cpu")
    job = method_setup(cfg.method)(cfg, bf16_accelerator)
    trainables = [p for group in job.trainable_parameters() for p in group["params"]]
    assert expected.trainable_parameters == sum(p.numel() for p in trainables)
    assert expected.trainable_bytes == sum(p.numel() * p.element_size() for p in trainables)
    trained = {id(p) for p in trainables}
    for name, module in job.model.modules().items():  # adapters and new token rows live inside the modules
        held = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in trained)
        assert expected.frozen_bytes[name] == held, name


def test_precision_and_checkpointing_move_the_estimate_the_right_way(tmp_path, tiny_checkpoint, image_folder):
    base = tiny_checkpoint("sd1")
    fp32 = estimate(_config(tmp_path, base, image_folder, "lora", mixed_precision="no"), "cpu")
    bf16 = estimate(_config(tmp_path, base, image_folder, "lora", mixed_precision="bf16"), "cpu")
    assert bf16.frozen_bytes["unet"] * 2 == fp32.frozen_bytes["unet"]
    assert bf16.trainable_bytes == fp32.trainable_bytes  # fp32 masters either way
    assert bf16.activation_bytes < fp32.activation_bytes
    plain = estimate(_config(tmp_path, base, image_folder, "lora", gradient_checkpointing=False), "cpu")
    saved = estimate(_config(tmp_path, base, image_folder, "lora", gradient_checkpointing=True), "cpu")
    assert saved.activation_bytes < plain.activation_bytes
    assert (
        saved.activation_bytes == plain.activation_bytes_other
        and plain.activation_bytes == saved.activation_bytes_other
    )
    cfg = _config(tmp_path, base, image_folder, "lora")
    one = estimate(cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": 1})}), "cpu")
    four = estimate(cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": 4})}), "cpu")
    assert four.activation_bytes == pytest.approx(4 * one.activation_bytes, rel=0.15)
    assert four.flops_per_step == pytest.approx(4 * one.flops_per_step, rel=0.15)


def test_a_run_that_does_not_fit_is_told_what_to_change(tmp_path, tiny_checkpoint, image_folder):
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, "lora", gradient_checkpointing=False)
    e = estimate(cfg, "cpu")
    e.suggestions = estimate_module.suggestions(cfg, e) or ["train.gradient_checkpointing: true (saves ~1 GiB)"]
    lines = summary_lines(e, free=e.peak_device_bytes // 2)
    assert any(line.strip().startswith("does not fit:") for line in lines)
    assert any(line.strip().startswith("try ") for line in lines)
    assert not any("does not fit" in line for line in summary_lines(e, free=e.peak_device_bytes * 2))


def test_estimate_json_has_the_fields_scripts_read(tmp_path, tiny_checkpoint, image_folder):
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, "lora", mixed_precision="no")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())), encoding="utf-8")
    result = CliRunner().invoke(app, ["estimate", str(path), "--json", "--measure", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("peak_host_bytes", "peak_device_bytes", "seconds_per_step"):
        assert data[key] > 0
    assert data["measured"]["peak_host_bytes"] > 0 and data["measured"]["seconds_per_step"] > 0
    human = CliRunner().invoke(app, ["estimate", str(path)])
    assert human.exit_code == 0 and "estimate: lora on sd1" in human.stdout and "time per step" in human.stdout


def test_every_run_prints_its_estimate_and_records_the_measured_peak(tmp_path, tiny_checkpoint, image_folder, capsys):
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, "lora", max_steps=1, mixed_precision="no")
    run(cfg)
    out = capsys.readouterr().out
    assert "estimate: lora on sd1" in out
    record = json.loads((tmp_path / "runs" / "lora" / "estimate.json").read_text())
    assert record["estimate"]["peak_host_bytes"] > 0 and record["measured"]["peak_host_bytes"] > 0
    assert "peak memory: host" in (tmp_path / "runs" / "lora" / "events.log").read_text()


def test_out_of_memory_is_one_line_with_the_estimate_and_the_last_checkpoint(
    tmp_path, tiny_checkpoint, image_folder, monkeypatch
):
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, "lora", max_steps=1, mixed_precision="no")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run_module, "train", out_of_memory)
    with pytest.raises(TrainingError) as exc:
        run(cfg)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("out of GPU memory during the run (estimated peak ")
    assert "Last good checkpoint: none" in message


def test_fused_backward_holds_one_gradient_instead_of_all(tmp_path, tiny_checkpoint, image_folder):
    base = tiny_checkpoint("sd1")
    plain = estimate(_full_config(tmp_path, base, image_folder, "finetune"), "cpu")
    fused = estimate(_full_config(tmp_path, base, image_folder, "finetune", fused_backward=True), "cpu")
    assert plain.gradient_bytes == plain.trainable_bytes
    assert 0 < fused.gradient_bytes < plain.gradient_bytes  # the largest tensor's (here the token table)


def test_schedule_free_counts_the_host_copy_of_the_trained_weights_while_previews_run(
    tmp_path, tiny_checkpoint, image_folder
):
    """Schedule-free AdamW previews and exports at its averaged weights while a host copy keeps the trained ones
    (``train.optim.eval_weights``): 4 bytes per trained parameter on top of the export's peak. With the fused
    backward pass the two estimates' output-writing phase differs by exactly that, and the peak is the largest phase."""
    base = tiny_checkpoint("sd1")
    peaks = {}
    for name in ("adamw", "schedulefree_adamw"):
        cfg = case_config(tmp_path, base, image_folder, "finetune", name=name, fused_backward=True)
        cfg = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"name": name})})
        peaks[name] = estimate(cfg, device="cpu", precision="no")
    n = peaks["adamw"].trainable_parameters
    outputs = {k: e.phase_bytes["writing outputs"] for k, e in peaks.items()}
    assert outputs["schedulefree_adamw"] - outputs["adamw"] == 4 * n
    for e in peaks.values():
        assert e.peak_host_bytes == e.runtime_host_bytes + max(e.phase_bytes.values())
