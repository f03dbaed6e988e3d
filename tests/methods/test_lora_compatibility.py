"""Every LoRA export is checked against A1111 / ComfyUI / InvokeAI / diffusers: compatibility.json and warnings."""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator

from sdtune.config import LoraConfig
from sdtune.core.events import EventBus, RunWarning
from sdtune.methods.lora import setup
from sdtune.tools.lora_check import check_file
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir

# the targets whose loaders apply each kind (tools/lora_check facts): diffusers converts LoRA/LoCon only
SUPPORTED = {"lora": ("a1111", "comfyui", "invoke", "diffusers"), "locon": ("a1111", "comfyui", "invoke", "diffusers"),
             "loha": ("a1111", "comfyui", "invoke"), "lokr": ("a1111", "comfyui", "invoke"),
             # DoRA per input column: the UIs' convention; diffusers drops a kohya file's dora_scale (its user takes
             # the PEFT-layout file, below)
             "dora": ("a1111", "comfyui", "invoke"),
             # OFT / BOFT: A1111 reads diag-OFT's oft_blocks (its kohya-OFT branch), not BOFT's; ComfyUI both, but it
             # never applies an OFT's rescale; InvokeAI and diffusers neither
             "oft": ("a1111", "comfyui"), "boft": ("comfyui",), "oft-rescaled": ("a1111",)}  # fmt: skip
ORTHOGONAL = {"oft": {}, "boft": {}, "oft-rescaled": {"rescaled": True}}


def _config(tmp_path, checkpoint, folder, adapter, **extra):
    size = {"rank": 2}
    if adapter in ORTHOGONAL:  # no rank: a block size
        size = {"block_size": 4, **ORTHOGONAL[adapter]}
        adapter = adapter.removesuffix("-rescaled")
    return LoraConfig.model_validate(
        {
            "method": "lora",
            "name": f"c-{adapter}",
            "output_dir": str(tmp_path / "runs"),
            **size,
            "adapter": adapter,
            "targets": "all" if adapter == "locon" else "attention_ff",
            "train_text_encoder": adapter in ("lora", "loha"),
            "model": {"base": str(checkpoint)},
            "data": {"path": str(folder), "batch_size": 1},
            "train": {"max_steps": 1},
            "preview": {"steps": 1, "before_training": False, "every_n_steps": 0},
            **extra,
        }
    )


def _train(tmp_path, checkpoint, folder, adapter, bus=None):
    cfg = _config(tmp_path, checkpoint, folder, adapter)
    job = setup(cfg, Accelerator(cpu=True))
    run = RunDir(f"{cfg.output_dir}/{cfg.name}")
    outputs = train(job, cfg, run, bus or EventBus(), Accelerator(cpu=True))
    return job, run, outputs


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("adapter", ["lora", "locon", "loha", "lokr", "dora", "oft", "boft", "oft-rescaled"])
def test_every_lora_file_sdtune_writes_passes_the_targets_of_its_kind(
    tmp_path, tiny_checkpoint, image_folder, family, adapter
):
    job = setup(_config(tmp_path, tiny_checkpoint(family), image_folder, adapter), Accelerator(cpu=True))
    outputs = job.export(tmp_path / "out", step=1)  # the export the loop calls (untrained weights: same keys)
    result = check_file(outputs[0], model=job.model)  # the tiny model's module list, not the real one's
    for target in SUPPORTED[adapter]:
        report = result["targets"][target]
        assert report.ok, (target, report.error, report.issues, report.ignored[:3])
        assert len(report.mapped) == len(result["targets"]["comfyui"].mapped) > 0
    stored = json.loads((tmp_path / "out" / "compatibility.json").read_text())[outputs[0].name]["targets"]
    assert {t for t, r in stored.items() if r["ok"]} == set(SUPPORTED[adapter])
    assert len(job.export_warnings) == 4 - len(SUPPORTED[adapter])
    if adapter in ORTHOGONAL:  # the others say why: refused files, kinds not applied, a rescale dropped
        assert stored["invoke"]["error"] and stored["diffusers"]["error"]
        said = " ".join(job.export_warnings)
        assert ("a1111 does not apply boft" in said) == (adapter == "boft")
        assert ("ComfyUI ignores the rescale" in said) == (adapter == "oft-rescaled")


def test_loha_export_warns_that_diffusers_drops_it(tmp_path, tiny_checkpoint, image_folder):
    seen = []
    bus = EventBus()
    bus.subscribe(seen.append)
    _, run, outputs = _train(tmp_path, tiny_checkpoint("sd1"), image_folder, "loha", bus)
    stored = json.loads((run.output / "compatibility.json").read_text())[outputs[0].name]["targets"]
    assert stored["diffusers"]["ok"] is False and "not LoRA down/up/alpha" in stored["diffusers"]["error"]
    assert "diffusers does not apply loha" in stored["diffusers"]["issues"][0]
    assert stored["a1111"]["ok"] and stored["comfyui"]["ok"] and stored["invoke"]["ok"]
    warnings = [e.message for e in seen if isinstance(e, RunWarning)]
    assert len(warnings) == 1 and "diffusers" in warnings[0] and outputs[0].name in warnings[0]
    assert "warning: " + warnings[0] in run.events_path.read_text()


def test_a_dora_in_the_peft_layout_is_one_diffusers_applies(tmp_path, tiny_checkpoint, image_folder):
    """For diffusers the DoRA is written as the exact plain LoRA of its merged delta: nothing to drop there."""
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, "dora", file_format="peft")
    job = setup(cfg, Accelerator(cpu=True))
    outputs = job.export(tmp_path / "out", step=1)
    report = check_file(outputs[0], model=job.model)["targets"]["diffusers"]
    assert report.ok and report.mapped and not report.ignored, (report.error, report.issues)
