"""The training loop: written once, used by every method.

A method hands the loop a :class:`Job` (what is trained, its loss, how to save it); the loop owns everything
else: data order, per-sample randomness, gradient accumulation, gradient averaging across processes, clipping,
the NaN guard, learning-rate schedules, checkpoints, resume, previews and events.

Exact resume: the example order is a pure function of (seed, epoch), and every sample's noise, timestep and
caption choice comes from a generator seeded by (seed, its global position in the example stream). A run
resumed from a checkpoint therefore replays exactly what an uninterrupted run would have done, and 2 processes
x batch B see the same samples with the same noise as 1 process x batch 2B.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator

from sdtune.config import dump_yaml
from sdtune.config.methods import RunBase
from sdtune.core.atomic import atomic_path, write_text
from sdtune.core.errors import TrainingError
from sdtune.core.events import (
    CheckpointSaved,
    Evaluated,
    EventBus,
    RunFailed,
    RunFinished,
    RunStarted,
    RunWarning,
    SampleSaved,
    StepEnd,
    ValidationLoss,
)
from sdtune.data.dataset import ImageCaptionSet
from sdtune.train.disk_errors import WriteGuard, disk_problem, failed_path, tensor_bytes
from sdtune.train.offload import Parking, park_frozen
from sdtune.train.optim import FusedBackward, LearningRate, eval_weights, make_optimizer
from sdtune.train.plots import plot_loss
from sdtune.train.precision import LossScaler
from sdtune.train.rundir import RunDir
from sdtune.train.selection import Selection

# (step, the run's eval/ folder) -> figures: sdtune.methods.evaluation.step_evaluator
EvaluateFn = Callable[[int, Path], dict[str, float]]


class Job(Protocol):
    """What a training method gives the loop."""

    initial_step: int  # steps already done before this run (e.g. an embedding file's step count)

    def trainable_parameters(self) -> list[dict]:
        """Parameter groups for the optimizer: ``{"params": [...], "lr": base rate}``."""

    def num_examples(self) -> int:
        """Number of training examples (before repeats)."""

    def loss(self, indices: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        """Mean loss over the examples ``indices``; sample i draws all its randomness from ``generators[i]``."""

    def after_step(self, step: int) -> None:
        """Called with the number of completed steps: once before the first step (also on resume) and after
        every optimizer step (e.g. to freeze something on a schedule)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable state, for checkpoints."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def export(self, out_dir: Path, step: int) -> list[Path]:
        """Write the artifacts users load elsewhere; return their paths."""

    def preview(self, out_dir: Path, step: int) -> tuple[list[Path], Path | None]:
        """Render preview images into ``out_dir``; return (paths, grid path)."""

    # Optional: ``validation_loss() -> float | None``, the loss on held-out examples at fixed noise and timesteps
    # (``None``: no validation set). The loop calls it every ``train.validation_every_n_steps`` if a job has it.
    # Optional: ``export_warnings``, lines about the last export (e.g. a LoRA key a target tool would drop); the loop
    # writes them to events.log and emits them as ``RunWarning`` events after the final export.
    # Optional: ``data``, the :class:`~sdtune.data.dataset.ImageCaptionSet` it trains on; with images of several
    # sizes (aspect-ratio buckets) the loop draws every batch from one size and logs the bucket histogram.


@dataclass
class ExampleStream:
    """Example k of the endless stream: epoch ``k // epoch_length``, shuffled per epoch from the seed.

    With ``groups`` (the size group of each example: aspect-ratio buckets) every aligned run of ``batch`` positions
    holds examples of one group: each epoch shuffles every group's examples (times ``repeats``), fills its last
    batch with other examples of the same group, and shuffles the order of the batches (as kohya does).
    """

    n: int
    repeats: int
    seed: int
    groups: Sequence[int] | None = None
    batch: int = 1

    def __post_init__(self) -> None:
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._members: list[np.ndarray] = []
        if self.groups is not None and len(set(self.groups)) > 1:
            if len(self.groups) != self.n:
                raise ValueError(f"groups: {len(self.groups)} entries for {self.n} examples")
            ids = np.asarray(self.groups)
            self._members = [np.flatnonzero(ids == g) for g in sorted(set(self.groups))]

    @property
    def epoch_length(self) -> int:
        if not self._members:
            return self.n * self.repeats
        return sum(-(-len(m) * self.repeats // self.batch) * self.batch for m in self._members)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if not self._members:
            return rng.permutation(self.epoch_length) % self.n
        batches = []
        for members in self._members:
            order = rng.permutation(np.tile(members, self.repeats))
            if pad := -len(order) % self.batch:
                order = np.concatenate([order, rng.choice(members, pad, replace=pad > len(members))])
            batches += list(order.reshape(-1, self.batch))
        return np.concatenate([batches[i] for i in rng.permutation(len(batches))])

    def index(self, k: int) -> int:
        epoch, pos = divmod(k, self.epoch_length)
        if epoch != self._epoch:
            self._order = self._epoch_order(epoch)
            self._epoch = epoch
        return int(self._order[pos])


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at global stream ``position``: independent of batching and processes."""
    state = np.random.SeedSequence([seed, position]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_rng(generator: torch.Generator) -> random.Random:
    """A Python RNG for a sample's caption choices (template, tag shuffle/dropout), drawn from its generator.

    Taking it as the generator's first draw keeps every sample's randomness a function of its stream position.
    """
    return random.Random(int(torch.randint(1 << 62, (1,), generator=generator)))


def _grad_norm(params: list[torch.nn.Parameter], mode: str, value: float) -> float:
    """Clip as configured and return the total gradient norm before clipping (NaN/inf when gradients are)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if mode == "value":
        norm = torch.nn.utils.clip_grad_norm_(grads, float("inf"))
        torch.nn.utils.clip_grad_value_(grads, value)
    else:
        norm = torch.nn.utils.clip_grad_norm_(grads, value if mode == "norm" else float("inf"))
    return float(norm)


GRADIENT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def _average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Every gradient averaged over the processes: flattened into buckets of about 25 MB per dtype (DDP's
    scheme), one all-reduce per bucket, then copied back into place. Every process has the same parameters with
    gradients, in the same order, so the buckets match."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    sizes: dict[torch.dtype, int] = {}
    for p in params:
        if p.grad is None:
            continue
        grad = p.grad
        chunks = buckets.setdefault(grad.dtype, [[]])
        if sizes.get(grad.dtype, 0) >= GRADIENT_BUCKET_BYTES:
            chunks.append([])
            sizes[grad.dtype] = 0
        chunks[-1].append(grad)
        sizes[grad.dtype] = sizes.get(grad.dtype, 0) + grad.numel() * grad.element_size()
    for chunks in buckets.values():
        for bucket in chunks:
            flat = accelerator.reduce(_flatten_dense_tensors(bucket), reduction="mean")
            for grad, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                grad.copy_(averaged)


_PROCESS_START = time.time()


def _stop_requested(run: RunDir, accelerator: Accelerator) -> bool:
    """The STOP file exists; with several processes, all agree (one reads it a moment before another)."""
    stop = run.stop_requested()
    if accelerator.num_processes > 1:
        flag = torch.tensor(float(stop), device=accelerator.device)
        stop = bool(accelerator.reduce(flag, reduction="sum") > 0)
    return stop


def train(
    job: Job, cfg: RunBase, run: RunDir, bus: EventBus, accelerator: Accelerator, evaluate: EvaluateFn | None = None
) -> list[Path]:
    """Train ``job`` to ``cfg.train.max_steps`` (resuming from the run's latest checkpoint); return output paths.

    With ``evaluate`` (``eval:``) the main process evaluates at step 0, every ``eval.every_n_steps`` and at the
    end; the best evaluated step is kept as a checkpoint and becomes ``output/``, and ``eval.patience`` can end
    the run early (:mod:`sdtune.train.selection`).

    A full disk or a refused write is one :class:`TrainingError` line (what, the space needed, the last good
    checkpoint, how to resume); the checkpoint being written is dropped whole, the previous one stays intact.
    """
    writes = WriteGuard(run)
    parking = None
    try:
        # what the steps never call (cached latents and prompts: the VAE, frozen text encoders) leaves the GPU
        parking = park_frozen(job, accelerator.device)
        return _train(job, cfg, run, bus, accelerator, writes, parking, evaluate)
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc, TrainingError) else exc
        if cause is None or disk_problem(cause) is None:
            raise
        error = exc if isinstance(exc, TrainingError) else writes.error(exc, "the run folder", failed_path(exc, run))
        latest = run.latest_checkpoint()
        with contextlib.suppress(Exception):  # the disk is full: the log line and listeners may fail too
            run.log(str(error))
        with contextlib.suppress(Exception):
            bus.emit(RunFailed(writes.step, str(error), str(latest.path) if latest else None))
        if error is exc:
            raise
        raise error from exc
    finally:
        if parking is not None:
            parking.release()


def _train(
    job: Job,
    cfg: RunBase,
    run: RunDir,
    bus: EventBus,
    accelerator: Accelerator,
    writes: WriteGuard,
    parking: Parking,
    evaluate: EvaluateFn | None,
) -> list[Path]:
    t, main = cfg.train, accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    batch, accum = cfg.data.batch_size, t.grad_accum
    per_step = batch * world * accum  # examples per optimizer step: effective batch
    groups = job.trainable_parameters()
    params = [p for g in groups for p in g["params"]]
    if t.fused_backward and world > 1:
        raise TrainingError(
            "train.fused_backward: steps inside the backward pass of one process; use it without launch"
        )
    clip_value = t.clip_value if t.clip_grad == "value" else None
    optimizer = (
        FusedBackward(groups, cfg.optimizer, clip_value) if t.fused_backward else make_optimizer(groups, cfg.optimizer)
    )
    scaler = LossScaler(accelerator.mixed_precision == "fp16", accelerator.device.type)
    if main:
        run.ensure()
        # A STOP left by a process that died before honouring it is stale; one written since this process started
        # (a signal that arrived during setup) still counts. An honoured request is removed at the end (below).
        run.clear_stop(older_than=_PROCESS_START)
    accelerator.wait_for_everyone()

    # 1. resume: trainable weights, optimizer, step and RNG from the newest complete checkpoint
    start, last_checkpoint = getattr(job, "initial_step", 0), None
    if (checkpoint := run.latest_checkpoint()) is not None:
        trainable, opt_state, state, rng = checkpoint.load()
        job.load_state_dict(trainable)
        optimizer.load_state_dict(opt_state)
        torch.set_rng_state(rng["torch"])
        scaler.load_state_dict(state.get("loss_scaler", {}))
        start, last_checkpoint = int(state["step"]), checkpoint.path
        if main:
            run.truncate_metrics(start)
            run.log(f"resumed from {checkpoint.path} at step {start}")
    if start >= t.max_steps:
        raise TrainingError(f"train.max_steps: the run is already at step {start}; raise max_steps to train further")
    lr = LearningRate(optimizer, cfg.optimizer, cfg.schedule, t.max_steps, start)
    data = getattr(job, "data", None)
    sizes = data.bucket_histogram() if isinstance(data, ImageCaptionSet) else {}
    size_groups = data.example_groups() if len(sizes) > 1 else None
    stream = ExampleStream(job.num_examples(), cfg.data.repeats, t.seed, size_groups, batch)
    if main and cfg.data.buckets and sizes:
        run.log("buckets (images per size): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.items()))

    saved_step = start if last_checkpoint is not None else -1  # the same on every process
    e = cfg.eval if evaluate is not None else None
    if e is None:
        evaluate = None
    selection = Selection.of(run.evaluations() if e else [], e.select, e.min_delta, e.patience) if e else None

    def users_weights():
        """Previews, the validation loss and exports see the weights users get (schedule-free: the average);
        checkpoints keep the training weights, so a resume continues from them."""
        return eval_weights(optimizer, cfg.optimizer)

    def exported(out_dir: Path, step: int) -> list[Path]:
        with users_weights(), parking.in_use():  # a whole-model export writes the parked VAE and text encoders
            return job.export(out_dir, step)

    def save_checkpoint(step: int) -> Path | None:
        nonlocal saved_step
        saved_step = step
        accelerator.wait_for_everyone()
        if not main:
            return None
        rng = {"torch": torch.get_rng_state()}
        trainable, opt_state = job.state_dict(), optimizer.state_dict()
        need = 2 * tensor_bytes(trainable) + tensor_bytes(opt_state) + tensor_bytes(rng)  # weights + export
        with writes.writing(f"checkpoint step-{step}", run.checkpoints / f"step-{step}", need):
            path = run.save_checkpoint(
                step,
                trainable,
                opt_state,
                {"step": step, "epoch": epoch(step)} | ({"loss_scaler": scaler.state_dict()} if scaler.enabled else {}),
                rng,
                export=lambda d: exported(d, step),
                keep_last=cfg.save.keep_last,
                config=dump_yaml(cfg),
                keep=frozenset({selection.best_step}) if selection and selection.best_step is not None else frozenset(),
            )
        plot_loss(run)
        run.log(f"checkpoint {path}")
        bus.emit(CheckpointSaved(step, str(path)))
        return path

    previewed_step, preview_seconds = -1, 0.0  # previews are timed apart from training

    def preview(step: int) -> None:
        nonlocal previewed_step, preview_seconds
        if not cfg.preview.enabled or previewed_step == step:
            return
        previewed_step = step
        if main:
            tic = time.perf_counter()
            with writes.writing(f"previews of step {step}", run.samples / f"step-{step}"), users_weights():
                with parking.in_use():
                    paths, grid = job.preview(run.samples / f"step-{step}", step)
            seconds = time.perf_counter() - tic
            preview_seconds += seconds
            run.log(f"previews of step {step}: {len(paths)} images in {seconds:.1f} s")
            bus.emit(SampleSaved(step, tuple(map(str, paths)), str(grid) if grid else None))

    eval_seconds = 0.0  # evaluations are timed apart from training too

    def evaluation(step: int) -> None:
        """Evaluate (main process), record the row, and let every process know the selected figure."""
        nonlocal eval_seconds
        if selection is None or step in selection.evaluated:
            return
        row: dict = {"step": step}
        if main:
            tic = time.perf_counter()
            with writes.writing(f"the evaluation of step {step}", run.eval_dir), users_weights():
                with parking.in_use():
                    figures = evaluate(step, run.eval_dir)
            seconds = time.perf_counter() - tic
            eval_seconds += seconds
            row |= figures | {"seconds": round(seconds, 2)}
            run.append_eval(row)
        if world > 1:  # the best step and early stop are decided alike everywhere (checkpoints wait for all)
            value = torch.tensor(float(row.get(e.select, math.nan)), device=accelerator.device)
            from accelerate.utils import broadcast

            value = float(broadcast(value, from_process=0))
            row = row if main else {"step": step} | ({} if math.isnan(value) else {e.select: value})
        selection.add(row)
        if main:
            shown = {k: v for k, v in row.items() if k not in ("step", "seconds")}
            run.log(f"evaluation of step {step}: " + ", ".join(f"{k} {v:g}" for k, v in shown.items()))
            write_text(run.report_path, json.dumps(report(step, "running"), indent=1))
            bus.emit(Evaluated(step, shown, selection.best_step, row.get("seconds", 0.0)))

    def report(step: int, stopped: str) -> dict:
        spent = time.perf_counter() - run_started - preview_seconds - eval_seconds
        return selection.report(step, stopped, eval_seconds, spent)

    def epoch(step: int) -> int:
        return step * per_step // stream.epoch_length + 1

    if main:
        run.log(f"training {cfg.method} from step {start} to {t.max_steps}, effective batch {per_step}")
    bus.emit(RunStarted(str(run.root), cfg.method, start, t.max_steps))
    run_started = time.perf_counter()
    if start == 0 and cfg.preview.before_training:
        preview(0)
    if start == 0:
        evaluation(0)  # the base model: drift's reference

    validate = getattr(job, "validation_loss", None) if t.validation_every_n_steps else None

    step, reason = start, "max steps reached"
    job.after_step(step)  # let the job set step-dependent state (also when resuming)
    while step < t.max_steps:
        writes.step = step
        rate = lr.set(step)
        if lr.finished:  # an A1111 schedule string that ends before max_steps ends training
            reason = "learning-rate schedule ended"
            break
        tic = time.perf_counter()
        total = torch.zeros((), device=accelerator.device)
        # 2. micro-batches: this process takes its slice of each micro-batch of the global stream
        for micro in range(accum):
            first = step * per_step + micro * batch * world + rank * batch
            positions = range(first, first + batch)
            indices = [stream.index(k) for k in positions]
            generators = [sample_generator(t.seed, k) for k in positions]
            with accelerator.autocast():
                loss = job.loss(indices, generators)
            if t.fused_backward and not torch.isfinite(loss.detach()).all():
                total += loss.detach().float()  # the backward pass would step: stop on the loss first (below)
                break
            scaler.scale(loss / accum).backward()
            total += loss.detach().float() / accum
        # 3. average gradients over processes, in buckets as DDP does (one all-reduce per ~25 MB, not per tensor)
        if world > 1:
            _average_gradients(params, accelerator)
            total = accelerator.reduce(total, reduction="mean")
        # 4. NaN guard: never step on a non-finite loss or gradient; the last checkpoint stays as it was. In fp16 an
        # overflowing gradient is the loss scale being too high: that step is skipped and the scale halved.
        scaler.unscale(optimizer)
        if isinstance(optimizer, FusedBackward):
            grad_norm = optimizer.take_grad_norm()
        else:
            grad_norm = _grad_norm(params, t.clip_grad, t.clip_value)
        loss_value = float(total)
        overflow = scaler.overflowed(grad_norm) and math.isfinite(loss_value)
        if not overflow and not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            partly = t.fused_backward and what == "gradient norm"  # weights stepped before the bad one
            message = (
                f"step {step + 1}: {what} is {loss_value if what == 'loss' else grad_norm}; stopped "
                + ("(this step updated some weights in memory only)" if partly else "without updating")
                + f". Last good checkpoint: {last_checkpoint or 'none'}. Lower optimizer.lr or use train.clip_grad: "
                + ("value" if t.fused_backward else "norm")
            )
            if main:
                run.log(message)
            bus.emit(RunFailed(step + 1, message, str(last_checkpoint) if last_checkpoint else None))
            raise TrainingError(message)
        skipped_at_scale = scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        if skipped_at_scale is not None and main:
            run.log(
                f"step {step + 1}: fp16 gradients overflowed at loss scale {skipped_at_scale:g}; update skipped, "
                f"scale now {scaler.current:g} ({scaler.skipped} skipped so far)"
            )
        step += 1
        job.after_step(step)
        speed = per_step / max(time.perf_counter() - tic, 1e-9)
        validation = None  # held-out loss at fixed noise and timesteps (main process; not in the step's speed)
        if main and validate is not None and step % t.validation_every_n_steps == 0:
            with accelerator.autocast(), users_weights():
                validation = validate()
        if main:
            row = {
                "step": step,
                "epoch": epoch(step),
                "loss": loss_value,
                "lr": rate,
                "images_per_second": round(speed, 3),
                "grad_norm": round(grad_norm, 6) if math.isfinite(grad_norm) else None,
            }
            if scaler.enabled:
                row |= {"loss_scale": scaler.current, "skipped_steps": scaler.skipped}
            run.append_metrics(row if validation is None else row | {"validation_loss": validation})
        bus.emit(StepEnd(step, t.max_steps, epoch(step), loss_value, rate, speed, grad_norm))
        if validation is not None:
            bus.emit(ValidationLoss(step, validation))
        if e is not None and step % e.every_n_steps == 0 and step < t.max_steps:
            evaluation(step)
            if e.keep_best and selection.best_step == step:  # the best so far: kept until a better one comes
                last_checkpoint = save_checkpoint(step) or last_checkpoint
            if selection.exhausted:
                reason = selection.stop_reason()
                break
        if cfg.save.every_n_steps and step % cfg.save.every_n_steps == 0 and step < t.max_steps and saved_step != step:
            last_checkpoint = save_checkpoint(step) or last_checkpoint
        if cfg.preview.every_n_steps and step % cfg.preview.every_n_steps == 0 and step < t.max_steps:
            preview(step)
        if _stop_requested(run, accelerator) and step < t.max_steps:
            reason = "stopped on request"
            break

    # 5. the end: the last evaluation, a resumable checkpoint (unless this step's was just written), the exported
    # files (with eval.keep_best: the best evaluated step's, the last step's in output/last/), final previews
    evaluation(step)
    if saved_step != step:
        save_checkpoint(step)
    outputs: list[Path] = []
    output_step = step  # the step whose files output/ holds
    if main:
        with writes.writing("the outputs", run.output, tensor_bytes(job.state_dict())):
            best = selection.best_step if e is not None and e.keep_best else None
            outputs = _best_outputs(run, best, step) if best is not None and best != step else None
            output_step = best if outputs is not None else step
            if outputs is None:
                shutil.rmtree(run.output / "last", ignore_errors=True)
                outputs = exported(run.output, step)
            else:
                exported(run.output / "last", step)
        for message in getattr(job, "export_warnings", ()):
            run.log(f"warning: {message}")
            bus.emit(RunWarning(step, message))
        run.log(f"finished at step {step} ({reason}); outputs: {', '.join(map(str, outputs))}")
    preview(step)
    train_seconds = time.perf_counter() - run_started - preview_seconds - eval_seconds
    if main:
        total = max(time.perf_counter() - run_started, 1e-9)
        run.log(
            f"time: training {train_seconds:.1f} s, previews {preview_seconds:.1f} s"
            + (f", evaluation {eval_seconds:.1f} s ({100 * eval_seconds / total:.1f} %)" if selection else "")
        )
        if selection is not None:
            final = selection.report(step, reason, eval_seconds, train_seconds)
            final |= {"output_step": output_step, "keep_best": output_step != step or final["best_step"] == step}
            write_text(run.report_path, json.dumps(final, indent=1))
            from sdtune.train.report import write_report

            write_report(run)
    if main and reason == "stopped on request":
        run.clear_stop()  # honoured: resuming starts clean
    bus.emit(RunFinished(step, tuple(map(str, outputs)), reason, train_seconds, preview_seconds, eval_seconds))
    return outputs


def _best_outputs(run: RunDir, best: int, step: int) -> list[Path] | None:
    """``output/`` made the files of the best step's checkpoint (copied, each atomically); None (with a log line)
    when that checkpoint is gone."""
    checkpoint = run.checkpoint(best)
    source = checkpoint.path / "export" if checkpoint is not None else None
    if source is None or not source.is_dir():
        run.log(f"eval: the best step {best} has no checkpoint left; output/ holds the last step {step}")
        return None
    for file in sorted(source.rglob("*")):
        if file.is_file():
            dest = run.output / file.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest) as tmp:
                shutil.copy2(file, tmp)
    listed = checkpoint.path / "outputs.json"
    names = json.loads(listed.read_text(encoding="utf-8")) if listed.is_file() else []
    outputs = [run.output / name for name in names]
    run.log(f"output/ holds the best evaluated step {best}; output/last/ the last step {step}")
    return outputs


SetupFn = Callable[..., Job]
