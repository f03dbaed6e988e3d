"""The training options from issue 18 in the config: defaults, accepted spellings, and one line per bad combination
that names the field and the fix (through the YAML loader, as ``sdtune validate`` and the web UI see them)."""

from __future__ import annotations

import math

import pytest
import yaml

from sdtune.config import load_train_config
from sdtune.config.block_weights import expand_block_weights
from sdtune.core.errors import ConfigError


def _load(tmp_path, method: str = "lora", **fields):
    raw = {"method": method, "name": "x", "data": {"path": "."}} | (
        {"token": "<x>"} if method == "textual_inversion" else {}
    )
    for key, value in fields.items():
        node = raw
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_train_config(path)


def test_defaults_leave_every_option_off(tmp_path):
    cfg = _load(tmp_path)
    t = cfg.train
    assert (t.multires_noise_iterations, t.multires_noise_discount, t.input_perturbation) == (0, 0.3, 0.0)
    assert (t.zero_terminal_snr, t.debiased_estimation, t.timestep_range, t.timestep_shift) == (False, False, None, 1)
    assert cfg.optimizer.betas == (0.9, 0.999)
    assert (cfg.down_lr_weight, cfg.mid_lr_weight, cfg.up_lr_weight, cfg.block_dims, cfg.block_alphas) == (None,) * 5


def test_accepted_values(tmp_path):
    assert _load(tmp_path, optimizer__name="lion").optimizer.betas == (0.9, 0.99)  # Lion's own default
    assert _load(tmp_path, optimizer__name="lion", optimizer__betas=[0.95, 0.98]).optimizer.betas == (0.95, 0.98)
    assert _load(tmp_path, optimizer__name="came", optimizer__betas=[0.9, 0.999, 0.99]).optimizer.betas[2] == 0.99
    cfg = _load(tmp_path, method="textual_inversion", train__zero_terminal_snr=True,
                model__prediction_type="v_prediction", train__timestep_range=[200, 1000])  # fmt: skip
    assert cfg.train.zero_terminal_snr and cfg.train.timestep_range == (200, 1000)
    cfg = _load(tmp_path, down_lr_weight="1,1,0.5,0", up_lr_weight="sine+0.25", block_dims="4,0,8")
    assert cfg.down_lr_weight == [1, 1, 0.5, 0] and cfg.up_lr_weight == "sine+0.25" and cfg.block_dims == [4, 0, 8]


BAD = [
    (
        {"train__zero_terminal_snr": True},
        "train.zero_terminal_snr: needs model.prediction_type: v_prediction (got auto)",
    ),
    ({"train__zero_terminal_snr": True, "model__prediction_type": "epsilon"}, "(got epsilon)"),
    ({"train__timestep_range": [500, 200]}, "train.timestep_range: needs 0 <= min < max <= 1000"),
    ({"train__timestep_range": [300, 300]}, "train.timestep_range: needs 0 <= min < max <= 1000"),
    ({"train__timestep_range": [0, 1001]}, "train.timestep_range: needs 0 <= min < max <= 1000"),
    ({"train__timestep_range": [-1, 500]}, "(got [-1, 500]); e.g. [200, 1000]"),
    ({"train__timestep_range": [1, 2, 3]}, "train.timestep_range"),
    ({"train__input_perturbation": -0.1}, "train.input_perturbation: must be >= 0 (got -0.1); e.g. 0.1"),
    ({"train__multires_noise_iterations": -2}, "train.multires_noise_iterations: must be >= 0 (got -2); e.g. 6"),
    ({"train__multires_noise_discount": 0}, "train.multires_noise_discount: must be > 0 (got 0); e.g. 0.3"),
    ({"train__timestep_shift": 0}, "train.timestep_shift: must be > 0 (got 0); e.g. 3.0"),
    ({"optimizer__name": "adam"}, "optimizer.name: must be one of 'adamw', 'adamw8bit', 'prodigy', 'adafactor'"),
    ({"optimizer__betas": [0.9, 0.99, 0.999]}, "optimizer.betas: only came takes a third beta"),
    ({"optimizer__betas": [0.9]}, "optimizer.betas: two numbers in [0, 1) (three for came) (got [0.9])"),
    ({"optimizer__betas": [0.9, 1.5]}, "optimizer.betas: two numbers in [0, 1)"),
    ({"ema": True, "optimizer__name": "schedulefree_adamw"}, "ema: schedulefree_adamw already averages"),
    ({"down_lr_weight": [1, 1], "up_lr_weight": [1, 1, 1]}, "up_lr_weight: the UNet has as many output blocks as"),
    ({"down_lr_weight": [1, -0.5]}, "down_lr_weight: multipliers must be >= 0 (got [1.0, -0.5])"),
    ({"up_lr_weight": "sinus"}, "up_lr_weight: a list of numbers or one of sine, cosine, linear, reverse_linear"),
    ({"mid_lr_weight": [1, 1]}, "mid_lr_weight: 1 value (SD 1.x/2.x) or 3 (SDXL) (got 2)"),
    ({"mid_lr_weight": [-1]}, "mid_lr_weight: multipliers must be >= 0"),
    ({"block_dims": [4, -1]}, "block_dims: one number >= 0 per UNet block (got [4, -1])"),
    ({"block_dims": [4, 4], "block_alphas": [1]}, "block_alphas: one per block_dims entry: 2 values (got 1)"),
    ({"block_alphas": [1, 1]}, "block_alphas: set block_dims too"),
    ({"down_lr_weight": "sine", "optimizer__lr": "1e-4:10, 1e-5"}, "optimizer.lr: a rate:step schedule string sets"),
    ({"up_lr_weight": [1], "train_unet": False, "train_text_encoder": True}, "up_lr_weight: block options apply to"),
]


@pytest.mark.parametrize(("fields", "message"), BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_combinations_are_one_line_errors_naming_field_and_fix(tmp_path, fields, message):
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, **fields)
    text = str(exc.value)
    assert message in text
    assert "\n" not in text


def kohya_preset(name: str, n: int) -> list[float]:
    """kohya-ss/sd-scripts ``get_block_lr_weight.get_list``, restated."""
    tokens = name.split("+")
    base = float(tokens[1]) if len(tokens) > 1 else 0.0
    if tokens[0] == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in reversed(range(n))]
    if tokens[0] == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in range(n)]
    if tokens[0] == "linear":
        return [i / (n - 1) + base for i in range(n)]
    if tokens[0] == "reverse_linear":
        return [i / (n - 1) + base for i in reversed(range(n))]
    return [0.0 + base] * n


@pytest.mark.parametrize("name", ["sine", "cosine", "linear", "reverse_linear", "zeros", "sine+0.5", "zeros+1"])
@pytest.mark.parametrize("n", [12, 9, 6])
def test_block_weight_presets_are_kohyas(name, n):
    got = expand_block_weights(name, n)
    assert got == pytest.approx(kohya_preset(name, n), abs=1e-12)
    assert len(set(got)) > 1 or name.startswith("zeros")
