"""Lion, CAME and schedule-free AdamW (pytorch-optimizer): the config reaches the optimizer, schedule-free's averaged
weights are what previews, validation and exports see, and its runs resume exactly."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from accelerate import Accelerator

from sdtune.config.blocks import OptimizerConfig
from sdtune.core.errors import TrainingError
from sdtune.core.events import EventBus
from sdtune.train.loop import train
from sdtune.train.optim import eval_weights, make_optimizer
from sdtune.train.rundir import RunDir

po = pytest.importorskip("pytorch_optimizer")

SETTINGS = {"lr": 3e-3, "betas": [0.8, 0.95], "weight_decay": 0.1}


def _steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], n: int = 4) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 5), (5,), (32, 64)]  # the big one: optimizer.train()'s interpolation back rounds some of its values
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]


@pytest.mark.parametrize(
    ("name", "extra", "reference"),
    [
        ("lion", {}, lambda ps: po.Lion(ps, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)),
        ("came", {}, lambda ps: po.CAME(ps, lr=3e-3, betas=(0.8, 0.95, 0.9999), weight_decay=0.1)),
        ("came", {"betas": [0.8, 0.95, 0.99]},
         lambda ps: po.CAME(ps, lr=3e-3, betas=(0.8, 0.95, 0.99), weight_decay=0.1)),
        ("schedulefree_adamw", {"eps": 1e-6},
         lambda ps: po.ScheduleFreeAdamW(ps, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, eps=1e-6)),
    ],
)  # fmt: skip
def test_each_optimizer_steps_as_pytorch_optimizers_own_class(name, extra, reference):
    ours, theirs = _params(), _params()
    cfg = OptimizerConfig.model_validate({"name": name} | SETTINGS | extra)
    optimizer = make_optimizer([{"params": ours, "lr": cfg.lr}], cfg)
    assert type(optimizer) is type(reference(theirs))
    _steps(optimizer, ours)
    _steps(reference(theirs), theirs)
    for a, b, start in zip(ours, theirs, _params(), strict=True):
        assert torch.equal(a, b)
        assert (a - start).abs().max() > 1e-3  # it moved
    # and the config's settings made a difference: the class defaults step elsewhere
    defaults = _params()
    _steps(type(optimizer)(defaults, lr=3e-3), defaults)
    assert any(not torch.equal(a, d) for a, d in zip(ours, defaults, strict=True))


def test_schedule_free_eval_weights_are_the_average_and_give_the_training_weights_back_exactly():
    params = _params()
    cfg = OptimizerConfig.model_validate({"name": "schedulefree_adamw", "lr": 1e-2})
    optimizer = make_optimizer([{"params": params, "lr": cfg.lr}], cfg)
    _steps(optimizer, params, 5)
    y = [p.detach().clone() for p in params]
    z = [optimizer.state[p]["z"].clone() for p in params]
    beta1 = optimizer.param_groups[0]["betas"][0]
    with eval_weights(optimizer, cfg):
        for p, yi, zi in zip(params, y, z, strict=True):  # x = (y - (1 - beta1) z) / beta1 (Defazio et al. 2024)
            torch.testing.assert_close(p.detach(), (yi - (1 - beta1) * zi) / beta1, rtol=1e-5, atol=1e-6)
            assert (p.detach() - yi).abs().max() > 1e-4
        assert not optimizer.param_groups[0]["train_mode"]
    assert optimizer.param_groups[0]["train_mode"]
    assert all(torch.equal(p.detach(), yi) for p, yi in zip(params, y, strict=True))
    x = params[2].detach().clone().lerp_(z[2], 1 - 1 / beta1)
    assert not torch.equal(x.lerp_(z[2], 1 - beta1), y[2])  # eval() then train() alone would not give y back
    adamw = OptimizerConfig(name="adamw")
    with eval_weights(optimizer, adamw):  # other optimizers: nothing changes
        assert all(torch.equal(p.detach(), yi) for p, yi in zip(params, y, strict=True))


class RecordingJob:
    """The loop's fake job (tests/train/test_loop.py's regression) that records the weights previews, validation and
    exports see."""

    initial_step = 0

    def __init__(self) -> None:
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.xs = torch.linspace(-1, 1, 10)
        self.seen: dict[str, list[torch.Tensor]] = {"preview": [], "validation": [], "export": []}

    def trainable_parameters(self):
        return [{"params": [self.w], "lr": 0.1}]

    def num_examples(self):
        return len(self.xs)

    def loss(self, indices, generators):
        noise = torch.stack([torch.randn((), generator=g) for g in generators]) * 0.1
        x = self.xs[indices]
        return ((self.w[0] * x + self.w[1] - (3 * x + 1 + noise)) ** 2).mean()

    def after_step(self, step):
        pass

    def validation_loss(self):
        w = self.w.detach().clone()
        self.seen["validation"].append(w)
        return float(((w[0] * self.xs + w[1] - (3 * self.xs + 1)) ** 2).mean())

    def state_dict(self):
        return {"w": self.w.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])

    def export(self, out_dir, step):
        self.seen["export"].append(self.w.detach().clone())
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "w.json").write_text(json.dumps(self.w.tolist()))
        return [out_dir / "w.json"]

    def preview(self, out_dir, step):
        self.seen["preview"].append(self.w.detach().clone())
        return [], None


def _config(tmp_path, max_steps=12, name="schedulefree_adamw"):
    from sdtune.config import TextualInversionConfig

    return TextualInversionConfig.model_validate(
        {
            "method": "textual_inversion",
            "name": "t",
            "output_dir": str(tmp_path),
            "token": "<x>",
            "data": {"path": ".", "batch_size": 2},
            "optimizer": {"name": name, "lr": 0.1},
            "save": {"every_n_steps": 4, "keep_last": 10},
            "preview": {"before_training": False, "every_n_steps": 4},
            "train": {"max_steps": max_steps, "validation_every_n_steps": 4},
        }
    )


def test_schedule_free_previews_validation_and_exports_see_the_average_and_resume_is_exact(tmp_path):
    job, cfg = RecordingJob(), _config(tmp_path / "whole")
    whole = RunDir(tmp_path / "whole" / "t")
    train(job, cfg, whole, EventBus(), Accelerator(cpu=True))
    # at every checkpoint: the trainable state is y, and x = (y - (1 - beta1) z) / beta1 (Defazio et al. 2024) is
    # what that step's validation, preview and checkpoint export saw
    beta1 = cfg.optimizer.betas[0]
    for i, checkpoint in enumerate(whole.list_checkpoints()):
        trainable, optimizer_state, state, _ = checkpoint.load()
        y, z = trainable["w"], optimizer_state["state"][0]["z"]
        x = (y - (1 - beta1) * z) / beta1
        exported = torch.tensor(json.loads((checkpoint.path / "export" / "w.json").read_text()))
        assert (x - y).abs().max() > 1e-4, state["step"]
        torch.testing.assert_close(exported, x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(job.seen["export"][i], x, rtol=1e-5, atol=1e-6)
        if state["step"] < cfg.train.max_steps:
            torch.testing.assert_close(job.seen["validation"][i], x, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(job.seen["preview"][i], x, rtol=1e-5, atol=1e-6)
    assert torch.equal(y, job.w.detach())  # after the run the parameters are the training weights again
    final = torch.tensor(json.loads((whole.root / "output" / "w.json").read_text()))
    torch.testing.assert_close(final, x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(job.seen["preview"][-1], x, rtol=1e-5, atol=1e-6)  # the last preview too

    # stopped at step 8 (checkpoints 4 and 8 with their eval-mode exports), resumed: bit-exact
    run = RunDir(tmp_path / "part" / "t")
    train(RecordingJob(), _config(tmp_path / "part", max_steps=8), run, EventBus(), Accelerator(cpu=True))
    resumed = RecordingJob()
    train(resumed, _config(tmp_path / "part"), run, EventBus(), Accelerator(cpu=True))
    assert torch.equal(resumed.w.detach(), job.w.detach())
    assert torch.equal(torch.tensor(json.loads((run.root / "output" / "w.json").read_text())), final)


def test_a_missing_optimizer_package_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    from sdtune.config import LoraConfig
    from sdtune.methods.run import run

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pytorch_optimizer" else real(name, *a)
    )
    cfg = LoraConfig.model_validate(
        {"method": "lora", "name": "x", "output_dir": str(tmp_path), "model": {"base": str(tmp_path / "missing")},
         "data": {"path": "."}, "optimizer": {"name": "came"}}
    )  # fmt: skip
    with pytest.raises(TrainingError) as exc:
        run(cfg, progress=False)
    assert str(exc.value) == (
        "optimizer.name: came needs the 'pytorch_optimizer' package; pip install pytorch-optimizer "
        "(or use optimizer.name: adamw)"
    )
    assert not (tmp_path / "x").exists()  # refused before the run folder, the model or the data were touched
