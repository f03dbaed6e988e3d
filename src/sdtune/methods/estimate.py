"""What a run will cost before it starts: peak memory (device and host) and time per step, from the model's
configs and the run's config only — no weights are read.

How each part is found:

- **frozen weights**: every component's parameter count (the modules built on the meta device from the configs
  :func:`sdtune.models.loading.model_configs` reads) times the bytes of the dtype it is stored in
  (:func:`sdtune.train.recipe.storage_dtypes`: the run's precision; fp32 for the components a full-weight method
  trains);
- **trainables, gradients, optimizer state, EMA**: the method's trainable tensors, counted on the meta model
  (LoRA adapters injected as the run would inject them), in fp32; the optimizer's state per parameter (AdamW 8 B,
  8-bit AdamW 2 B, Prodigy 16 B, SGD 4 B, Adafactor ~0);
- **activations**: one training forward pass of the UNet on the meta device at the run's batch and resolution in
  the compute dtype, counting every tensor autograd saves for the backward pass (once each, weights excluded),
  with gradient checkpointing as configured and, for comparison, the other way; with checkpointing, the largest
  block recomputed during the backward pass is added;
- **time per step**: the UNet forward pass's FLOPs (``torch.utils.flop_counter`` on the meta device) times the
  passes a step makes (forward, the backward for inputs, for weights when they train, a recomputed forward with
  checkpointing), over this device's measured matrix-product rate in the compute dtype times the efficiency a
  real step reaches (calibrated on this machine's benchmarks; see BENCHMARKS.md);
- **host memory**: the process's runtime (torch, diffusers, transformers imported) plus, on a CPU, everything
  above; on a GPU, the weights pass through host memory while loading.

The calibration constants below come from measured runs (``benchmarks/real_size.py``); ``measure`` runs real
steps and reports the measured figures beside the estimate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdtune.config.methods import RunBase
from sdtune.data.latents import encode_batch_size
from sdtune.models.components import build_modules
from sdtune.models.family import ModelFamily
from sdtune.models.loading import model_configs
from sdtune.train.optim import SCHEDULE_FREE
from sdtune.train.precision import cpu_has_bf16, resolve_precision
from sdtune.train.recipe import storage_dtypes

GIB = 2**30
# Calibration (benchmarks/real_size.py on this repository's 2-core CPU; BENCHMARKS.md):
RUNTIME_HOST_BYTES = int(0.75 * GIB)  # torch + diffusers + transformers + peft imported, allocator pools
ACTIVATION_FACTOR = 1.25  # saved tensors -> peak during backward (gradients of activations, workspace)
# a real step's FLOP rate / the bare matmul rate, per device and compute dtype (CPU: measured; CUDA: a guess until
# a GPU benchmark calibrates it)
STEP_EFFICIENCY = {("cpu", torch.float32): 0.45, ("cpu", torch.bfloat16): 0.29}
DEFAULT_EFFICIENCY = 0.40
RECOMPUTE_PASSES = 0.5  # checkpointing's recomputed forward, in forward passes (measured: 1.26x a plain step)
# The optimizer update and the master-weight casts of full-weight training move about this many bytes per trained
# parameter and step, at this fraction of the measured copy rate (fit to the SD 1.5 fine-tune row of BENCHMARKS.md)
UPDATE_BYTES_PER_PARAMETER = 36
UPDATE_EFFICIENCY = 0.11  # CPU AdamW is bound by its arithmetic, not by the copy rate
# Lion: one momentum; CAME: a momentum plus factored (row + column) statistics; schedule-free AdamW: z and the second
# moment (its eval-weights switch copies the trained weights to host memory for the moment previews take).
OPTIMIZER_BYTES = {
    "adamw": 8,
    "adamw8bit": 2,
    "prodigy": 16,
    "adafactor": 0,
    "sgd": 4,
    "lion": 4,
    "came": 4,
    "schedulefree_adamw": 8,
}
_FULL_WEIGHT_METHODS = ("dreambooth", "finetune")


@dataclasses.dataclass
class Estimate:
    method: str
    family: str
    device: str
    precision: str
    resolution: int
    batch_size: int
    gradient_checkpointing: bool
    frozen_bytes: dict[str, int]
    trainable_parameters: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    ema_bytes: int
    activation_bytes: int
    activation_bytes_other: int  # with checkpointing switched the other way
    encode_bytes: int  # the latent cache's encoding, before step 1
    export_bytes: int  # a full-weight method's export: its weights converted to save.dtype, after the last step
    runtime_host_bytes: int
    seconds_per_step: float
    flops_per_step: float
    peak_device_bytes: int
    peak_host_bytes: int
    suggestions: list[str]
    phase_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # on the device, per phase of a run
    measured: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def estimate(cfg: RunBase, device: str | None = None, precision: str | None = None) -> Estimate:
    """The expected cost of training ``cfg`` on ``device`` (``cuda`` or ``cpu``; default: CUDA when present) in
    ``precision`` (accelerate's ``no``/``bf16``/``fp16``; default: what ``train.mixed_precision`` resolves to)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    family, configs = model_configs(cfg.model.base)
    precision = precision or resolve_precision(cfg.train.mixed_precision, device, base=cfg.model.base)
    full = cfg.method in _FULL_WEIGHT_METHODS
    dtypes = storage_dtypes(cfg, precision, reduced=not full)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)  # pixels per latent pixel
    resolution = cfg.data.resolution or int(configs["unet"]["sample_size"]) * scale
    batch = cfg.data.batch_size

    modules = build_modules(configs, empty=True)
    trained = _trained_components(cfg)
    frozen = {}
    for name, module in modules.items():
        count = sum(p.numel() for p in module.parameters())
        size = 4 if name in trained else torch.empty((), dtype=dtypes[name]).element_size()
        frozen[name] = count * size
        if name == "unet" and getattr(cfg, "fp8_base", False):  # linear weights: 1 byte + an fp32 scale per row
            linears = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)]
            frozen[name] -= sum(w.numel() * (size - 1) - 4 * w.shape[0] for w in linears)
    preservation = getattr(cfg, "preservation", None)
    if full and preservation is not None:  # a frozen copy of what trains, in the compute precision
        size = torch.empty((), dtype=compute).element_size()
        frozen["base copy"] = sum(p.numel() for n in trained if n in modules for p in modules[n].parameters()) * size
    trainables = _trainable_parameters(cfg, modules, trained, family)
    n_train = sum(p.numel() for p in trainables)
    trainable_bytes = 4 * n_train
    if full:  # the trained components are the trainables: not frozen bytes as well
        frozen = {k: (0 if k in trained else v) for k, v in frozen.items()}
    optimizer_bytes = OPTIMIZER_BYTES[cfg.optimizer.name] * n_train
    ema_bytes = 4 * n_train if getattr(cfg, "ema", False) else 0

    checkpointing = cfg.train.gradient_checkpointing
    through_text = (
        cfg.method == "textual_inversion"
        or bool(getattr(cfg, "token", None))
        or any(n.startswith("text_encoder") for n in trained)
        or bool(getattr(cfg, "train_text_encoder", False))
    )
    plain, checkpointed, flops = _unet_pass(modules["unet"], configs, batch, resolution, compute, through_text)
    saved, saved_other = (checkpointed, plain) if checkpointing else (plain, checkpointed)
    # regularisation samples train beside the batch (one backward for all) and the base predicts them once
    extra = _preservation_samples(preservation, batch)
    grow = (batch + extra) / batch
    activations = int(ACTIVATION_FACTOR * saved * grow)
    activations_other = int(ACTIVATION_FACTOR * saved_other * grow)

    vae_dtype = torch.empty((), dtype=dtypes["vae"]).element_size()
    encode_images = encode_batch_size(resolution, resolution)
    # The VAE encoder's largest live tensors: a few 128-channel maps at full resolution per image (no grad).
    encode_bytes = 3 * 128 * resolution * resolution * vae_dtype * encode_images

    weights = sum(frozen.values())
    # gradients: all of them at once, or with train.fused_backward one tensor's at a time
    largest = max((p.numel() for p in trainables), default=0)
    gradient_bytes = 4 * largest if cfg.train.fused_backward else trainable_bytes
    kept = trainable_bytes + optimizer_bytes + ema_bytes
    save_size = {"fp32": 4}.get(getattr(cfg.save, "dtype", "fp16"), 2)
    export_bytes = n_train * save_size if full else 0
    # schedule-free AdamW: previews and exports run at its averaged weights while a host copy keeps the trained ones
    eval_copy = 4 * n_train if cfg.optimizer.name in SCHEDULE_FREE else 0
    phases = {
        "training step": weights + kept + gradient_bytes + activations,
        "caching latents": weights + encode_bytes,
        "writing outputs": weights + kept + export_bytes + (eval_copy if device == "cpu" else 0),
    }
    on_device = max(phases.values())
    if device == "cpu":
        peak_host, peak_device = RUNTIME_HOST_BYTES + on_device, RUNTIME_HOST_BYTES + on_device
    else:
        peak_device = on_device
        # the weights pass through host memory while loading; the schedule-free copy lives there during previews
        peak_host = RUNTIME_HOST_BYTES + max(weights, eval_copy)

    # forward, backward to the inputs, backward to the weights (when they train), recomputation (checkpointing)
    passes = 2.0 + (1.0 if full else 0.0) + (RECOMPUTE_PASSES if checkpointing else 0.0)
    step_flops = (passes * flops * grow + flops * extra / batch) * cfg.train.grad_accum
    efficiency = STEP_EFFICIENCY.get((device, compute), DEFAULT_EFFICIENCY)
    seconds = step_flops / (_matmul_rate(device, compute) * efficiency)
    seconds += n_train * UPDATE_BYTES_PER_PARAMETER / (_copy_rate(device) * UPDATE_EFFICIENCY)
    result = Estimate(
        method=cfg.method,
        family=family.name,
        device=device,
        precision=precision,
        resolution=resolution,
        batch_size=batch,
        gradient_checkpointing=checkpointing,
        frozen_bytes=frozen,
        trainable_parameters=n_train,
        trainable_bytes=trainable_bytes,
        gradient_bytes=gradient_bytes,
        optimizer_bytes=optimizer_bytes,
        ema_bytes=ema_bytes,
        activation_bytes=activations,
        activation_bytes_other=activations_other,
        encode_bytes=encode_bytes,
        export_bytes=export_bytes,
        runtime_host_bytes=RUNTIME_HOST_BYTES,
        seconds_per_step=seconds,
        flops_per_step=step_flops,
        peak_device_bytes=int(peak_device),
        peak_host_bytes=int(peak_host),
        suggestions=[],
        phase_bytes={k: int(v) for k, v in phases.items()},
    )
    result.suggestions = suggestions(cfg, result)
    return result


def _preservation_samples(preservation: Any, batch: int) -> int:
    """Regularisation samples a step adds to a batch of ``batch`` (trigger-free ones counted for every sample)."""
    if preservation is None:
        return 0
    reg = math.ceil(preservation.ratio * batch) if preservation.has_images and preservation.weight > 0 else 0
    return reg + (batch if preservation.trigger is not None and preservation.trigger_weight > 0 else 0)


def _trained_components(cfg: RunBase) -> set[str]:
    """The components a full-weight method trains (their weights are the trainables)."""
    if cfg.method not in _FULL_WEIGHT_METHODS:
        return set()
    out = {"unet"} if getattr(cfg, "train_unet", True) else set()
    if getattr(cfg, "train_text_encoder", False):
        out |= {"text_encoder", "text_encoder_2"}
    return out


def _trainable_parameters(
    cfg: RunBase, modules: dict, trained: set[str], family: ModelFamily
) -> list[torch.nn.Parameter]:
    """The tensors the method trains, on the meta-device model."""
    for module in modules.values():
        module.requires_grad_(False)
    if cfg.method in _FULL_WEIGHT_METHODS:
        return [p for name in trained if name in modules for p in modules[name].parameters()]
    if cfg.method == "lora":
        from sdtune.adapters.lora import inject
        from sdtune.methods.lora import adapter_configs

        components = {"unet": modules["unet"]} if cfg.train_unet else {}
        if cfg.train_text_encoder:
            components |= {n: m for n, m in modules.items() if n.startswith("text_encoder")}
        configs = adapter_configs(cfg, components, family)
        params = [p for name, config in configs.items() for p in inject(modules[name], config)]
        if cfg.token:
            params += _token_rows(modules, cfg.num_vectors)
        return params
    if cfg.method == "textual_inversion":
        return _token_rows(modules, cfg.num_vectors)
    if cfg.method == "hypernetwork":
        from sdtune.adapters.hypernetwork import Hypernetwork
        from sdtune.methods.hypernetwork import spec_of

        sizes = cfg.sizes or [int(modules["unet"].config.cross_attention_dim)]
        with torch.device("meta"):
            return list(Hypernetwork(sizes, spec_of(cfg)).parameters())
    return []


def _token_rows(modules: dict, num_vectors: int) -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(torch.empty(num_vectors, m.config.hidden_size, device="meta"))
        for n, m in modules.items()
        if n.startswith("text_encoder")
    ]


CHECKPOINTED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")  # what diffusers' checkpointing recomputes


def _unet_pass(
    unet: torch.nn.Module,
    configs: dict,
    batch: int,
    resolution: int,
    dtype: torch.dtype,
    needs_input_grad: bool,
) -> tuple[int, int, float]:
    """One training forward pass of the UNet on the meta device: (bytes autograd saves for the backward pass
    without checkpointing, the same with checkpointing, the pass's FLOPs).

    Both from the one pass: with checkpointing, what a ResNet or transformer block saves is dropped and its input
    kept instead, and the backward pass holds the largest block's saved tensors again while it recomputes it."""
    from torch.utils.flop_counter import FlopCounterMode

    for p in unet.parameters():  # trainables are fp32 masters, computed in the compute dtype under autocast
        p.data = p.data.to(dtype)
    for b in unet.buffers():
        b.data = b.data.to(dtype) if b.is_floating_point() else b.data
    unet.train()
    config = configs["unet"]
    latent = resolution // 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    meta = {"device": "meta", "dtype": dtype}
    sample = torch.empty(batch, config.get("in_channels", 4), latent, latent, **meta)
    context = torch.empty(batch, 77, int(config["cross_attention_dim"]), **meta).requires_grad_(needs_input_grad)
    kwargs: dict[str, Any] = {}
    if config.get("addition_embed_type") == "text_time":
        time_ids = 6 * int(config["addition_time_embed_dim"])
        pooled = int(config["projection_class_embeddings_input_dim"]) - time_ids
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, **meta),
            "time_ids": torch.empty(batch, 6, **meta),
        }
    params = {id(p) for p in unet.parameters()}
    seen: dict[int, torch.Tensor] = {}
    state = {"depth": 0, "outside": 0, "total": 0, "inputs": 0, "block": 0, "largest": 0}

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) in params or id(t) in params or id(base) in seen:
            return t
        seen[id(base)] = base
        state["total"] += nbytes(base)
        state["block" if state["depth"] else "outside"] += nbytes(base)
        return t

    def enter(_module, args):
        if state["depth"] == 0:
            state["block"] = 0
            state["inputs"] += sum(nbytes(a) for a in args if isinstance(a, torch.Tensor))
        state["depth"] += 1

    def leave(*_):
        state["depth"] -= 1
        if state["depth"] == 0:
            state["largest"] = max(state["largest"], state["block"])

    blocks = [m for m in unet.modules() if type(m).__name__ in CHECKPOINTED_BLOCKS]
    hooks = [b.register_forward_pre_hook(enter) for b in blocks] + [b.register_forward_hook(leave) for b in blocks]
    counter = FlopCounterMode(display=False)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter, _fused_attention():
            unet(sample, torch.full((batch,), 500, device="meta"), context, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    checkpointed = state["outside"] + state["inputs"] + state["largest"]
    return state["total"], checkpointed, float(counter.get_total_flops())


@contextlib.contextmanager
def _fused_attention():
    """On the meta device SDPA takes its math path, which keeps the whole attention matrix for the backward pass;
    real runs take a fused kernel (flash / memory-efficient on CPUs and GPUs) that keeps only q, k, v, the output
    and a log-sum-exp. The meta pass uses the fused kernel's meta function, so it saves what real runs save."""
    functional = torch.nn.functional
    plain = functional.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
        if attn_mask is not None or extra or query.device.type != "meta":
            return plain(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **extra)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(query, key, value, dropout_p, is_causal, scale=scale)[0]

    functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = plain


_RATES: dict[tuple[str, torch.dtype | None], float] = {}


def _matmul_rate(device: str, dtype: torch.dtype) -> float:
    """This device's FLOP/s for large matrix products in ``dtype`` (measured once per process, ~0.2 s)."""
    key = (device, dtype)
    if key not in _RATES:
        n = 1024 if device == "cpu" else 4096
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm up
        if device == "cuda":
            torch.cuda.synchronize()
        reps, tic = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - tic < 0.15:
            a @ b
            reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        _RATES[key] = 2 * n**3 * reps / (time.perf_counter() - tic)
    return _RATES[key]


def _copy_rate(device: str) -> float:
    """This device's memory bandwidth in bytes/s (read + write of a 256 MB copy; measured once per process)."""
    key = (device, None)
    if key not in _RATES:
        a = torch.empty(64 * 2**20, device=device)
        b = torch.empty_like(a)
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        reps, tic = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - tic < 0.1:
            b.copy_(a)
            reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        _RATES[key] = 2 * a.numel() * a.element_size() * reps / (time.perf_counter() - tic)
    return _RATES[key]


def device_memory(device: str) -> int | None:
    """Free memory where the run trains: the GPU's free bytes, or the host's available RAM."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of accelerate
        return None


def suggestions(cfg: RunBase, e: Estimate) -> list[str]:
    """The cheapest changes that lower the peak, each with the bytes it saves, biggest first (only those that
    save at least 64 MiB and 5 % of the peak)."""
    out: list[tuple[int, str]] = []
    if not e.gradient_checkpointing:
        out.append((e.activation_bytes - e.activation_bytes_other, "train.gradient_checkpointing: true"))
    bf16_here = torch.cuda.is_bf16_supported() if e.device == "cuda" else cpu_has_bf16()
    if e.precision == "no" and bf16_here:
        out.append((sum(e.frozen_bytes.values()) // 2 + e.activation_bytes // 2, "train.mixed_precision: bf16"))
    if cfg.optimizer.name in ("adamw", "prodigy"):
        out.append((e.optimizer_bytes - 2 * e.trainable_parameters, "optimizer.name: adamw8bit"))
    if e.batch_size > 1:
        saved = e.activation_bytes * (e.batch_size - 1) // e.batch_size
        out.append((saved, "data.batch_size: 1 with train.grad_accum to keep the batch"))
    if e.resolution > 512:
        smaller = e.resolution * 3 // 4 // 64 * 64
        out.append((int(e.activation_bytes * (1 - (smaller / e.resolution) ** 2)), f"data.resolution: {smaller}"))
    floor = max(64 * 2**20, e.peak_device_bytes // 20)
    return [f"{text} (saves ~{_gib(saved)})" for saved, text in sorted(out, reverse=True) if saved >= floor]


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def summary_lines(e: Estimate, free: int | None = None) -> list[str]:
    """The estimate for a person: one line per part, then whether it fits and what to change."""
    where = "host" if e.device == "cpu" else "GPU"
    lines = [
        f"estimate: {e.method} on {e.family} at {e.resolution}px, batch {e.batch_size}, {e.precision}, "
        f"checkpointing {'on' if e.gradient_checkpointing else 'off'} ({e.device})",
        "  frozen weights   " + ", ".join(f"{k} {_gib(v)}" for k, v in e.frozen_bytes.items() if v),
        f"  trainables       {_gib(e.trainable_bytes)} ({e.trainable_parameters / 1e6:.1f} M parameters, fp32)"
        f" + gradients {_gib(e.gradient_bytes)} + optimizer {_gib(e.optimizer_bytes)}"
        + (f" + EMA {_gib(e.ema_bytes)}" if e.ema_bytes else ""),
        f"  activations      {_gib(e.activation_bytes)} (checkpointing {'off' if e.gradient_checkpointing else 'on'}:"
        f" {_gib(e.activation_bytes_other)})",
        f"  peak {where:<5}       {_gib(e.peak_device_bytes)}"
        + (f"; host {_gib(e.peak_host_bytes)}" if e.device != "cpu" else ""),
        f"  time per step    {_seconds(e.seconds_per_step)}",
    ]
    if free is not None and e.peak_device_bytes > free:
        lines.append(f"  does not fit: {_gib(e.peak_device_bytes)} needed, {_gib(free)} free on the {where}")
        lines += [f"    try {s}" for s in e.suggestions[:4]]
    elif e.suggestions and free is None:
        lines.append("  to use less memory: " + "; ".join(e.suggestions[:3]))
    return lines


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.3g} s"


def measure_steps(cfg: RunBase, steps: int, workdir: Path, run: Callable[..., Any]) -> dict[str, float]:
    """Run ``steps`` real steps of ``cfg`` (previews, checkpoints and exports off, in ``workdir``) with ``run``
    (:func:`sdtune.methods.run.run`) and return the measured peak host memory and seconds per step."""
    import json

    trial = cfg.model_copy(deep=True)
    trial.name, trial.output_dir = "estimate-measure", str(workdir)
    trial.train.max_steps = steps + 1  # the first step warms caches up and is not timed
    trial.preview.enabled = False
    trial.save.every_n_steps = 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    from rich.console import Console

    run(trial, progress=False, console=Console(quiet=True))
    rows = [json.loads(line) for line in (workdir / trial.name / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_second"] for r in rows[1:]] or [rows[-1]["images_per_second"]]
    per_step = trial.data.batch_size * trial.train.grad_accum
    out = {
        "peak_host_bytes": float(peak_rss()),
        "seconds_per_step": per_step / sorted(speeds)[len(speeds) // 2],
    }
    if torch.cuda.is_available():
        out["peak_device_bytes"] = float(torch.cuda.max_memory_allocated())
    return out


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
