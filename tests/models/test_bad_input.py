"""Bad model files give one-line errors naming the file and what was expected; pickles never run code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sdtune.core.errors import ModelError
from sdtune.models.loading import detect, load_model, save_model


def _one_line(exc: pytest.ExceptionInfo, path) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_text_file_renamed_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes, not a model\n" * 10)
    with pytest.raises(ModelError) as exc:
        load_model(path)
    assert "not a safetensors file" in _one_line(exc, path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_text_file_renamed_ckpt(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are my notes, not a model\n" * 10)
    with pytest.raises(ModelError) as exc:
        load_model(path)
    assert "not a PyTorch checkpoint" in _one_line(exc, path)


def test_truncated_safetensors(tiny_model, tmp_path):
    path = save_model(tiny_model("sd1"), tmp_path / "m.safetensors", dtype=torch.float16)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    for call in (detect, load_model):
        with pytest.raises(ModelError) as exc:
            call(cut)
        assert "truncated" in _one_line(exc, cut)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["SDTUNE_PWNED"],))


def test_ckpt_whose_pickle_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SDTUNE_PWNED", str(marker))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(ModelError) as exc:
        load_model(path)
    assert "refused to load" in _one_line(exc, path)
    assert not marker.exists(), "the pickle's code ran"


def test_plain_pickle_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SDTUNE_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(ModelError) as exc:
        detect(path)
    _one_line(exc, path)
    assert not marker.exists()


def test_checkpoint_of_no_known_family(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "some_other_encoder.weight": torch.zeros(2),
        },
        path,
    )
    with pytest.raises(ModelError) as exc:
        load_model(path)
    assert "no known text encoder" in _one_line(exc, path)


def test_random_tensors_file(tmp_path):
    path = tmp_path / "random.safetensors"
    save_file({"layer.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ModelError) as exc:
        detect(path)
    assert "expected an SD 1.x, 2.x or XL checkpoint" in _one_line(exc, path)


def test_lora_file_is_named_as_such(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, path)
    with pytest.raises(ModelError) as exc:
        load_model(path)
    assert "is a LoRA file" in _one_line(exc, path)


def test_checkpoint_with_wrong_shapes(tiny_model, tmp_path):
    """A checkpoint whose tensors do not fit the family's architecture (here: no sdtune config) fails cleanly."""
    from safetensors.torch import load_file

    path = save_model(tiny_model("sd1"), tmp_path / "m.safetensors", dtype=torch.float16)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)  # tiny widths, but without metadata the real SD 1.5 config is used
    with pytest.raises(ModelError) as exc:
        load_model(bare)
    assert "does not match the sd1 architecture" in _one_line(exc, bare)


def test_missing_path():
    with pytest.raises(ModelError, match="no such file or folder"):
        load_model("/nonexistent/model.safetensors")
