"""Family detection over a table: every family x {diffusers folder, .safetensors, .ckpt}."""

from __future__ import annotations

import pytest
import torch

from sdtune.core.errors import ModelError
from sdtune.models.family import ModelFamily
from sdtune.models.loading import detect, save_model

FAMILIES = ["sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sdxl", "sdxl-inpaint"]
LAYOUTS = ["diffusers", "m.safetensors", "m.ckpt"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_detects_every_family_in_every_layout(tiny_model, tmp_path, name, layout):
    model = tiny_model(name)
    if layout == "diffusers":
        path = save_model(model, tmp_path / "model", layout="diffusers", dtype=torch.float32)
    else:
        path = save_model(model, tmp_path / layout, dtype=torch.float16)
    detection = detect(path)
    assert detection.family == ModelFamily.parse(name)
    assert detection.layout == ("diffusers" if layout == "diffusers" else layout.split(".")[1])


@pytest.mark.parametrize("name", FAMILIES + ["sd2-v-inpaint"])
def test_family_names_round_trip(name):
    assert ModelFamily.parse(name).name == name


def test_family_properties():
    assert ModelFamily.parse("sd2-v").resolution == 768
    assert ModelFamily.parse("sd2").resolution == 512
    assert ModelFamily.parse("sdxl").num_text_encoders == 2
    assert ModelFamily.parse("sd1-inpaint").inpainting


def test_unknown_family_name_is_an_error():
    with pytest.raises(ModelError, match="unknown model family 'sd3'"):
        ModelFamily.parse("sd3")


def test_sd2_file_without_prediction_metadata_is_assumed_v_and_says_so(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_model(tiny_model("sd2"), tmp_path / "m.safetensors", dtype=torch.float16)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)  # same tensors, no metadata: like a file from elsewhere
    detection = detect(bare)
    assert detection.family.prediction_type == "v_prediction"
    assert any("assumed v-prediction" in note for note in detection.notes)
    assert detect(path).family.prediction_type == "epsilon"  # sdtune's own file says what it is


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_a_v_prediction_sd1_or_sdxl_model_loads_with_its_tokenizers(tiny_model, tmp_path, arch):
    from sdtune.models.loading import load_model

    path = save_model(tiny_model(arch), tmp_path / "m.safetensors", dtype=torch.float32)
    model = load_model(path, prediction_type="v_prediction")  # e.g. for train.zero_terminal_snr
    assert model.family == ModelFamily(arch, "v_prediction")
    assert len(model.tokenizers) == len(model.text_encoders) == (2 if arch == "sdxl" else 1)
    assert model.noise_scheduler().config.prediction_type == "v_prediction"
