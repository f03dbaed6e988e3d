"""Probe the built-in model's held-out pairing during the build's phase 2 (BENCHMARKS.md, issue 4).

    python benchmarks/pairing_probe.py build WORK --phase1 DIR [--minutes 300] [--every 250] [--set key=value ...]
    python benchmarks/pairing_probe.py export WORK ema_750.pt OUT_DIR
    python benchmarks/pairing_probe.py score MODEL_DIR [--ti-steps 500]

``build`` re-runs phase 2 of ``tools/builtin_build`` (decoder 2, latents 2, UNet 2; ``--set key=value`` overrides
``BuildSettings``) from a phase-1 model folder (session 1's committed weights: ``git archive 9c3d3c3
src/sdtune/models/assets/builtin``) and saves the UNet/text-encoder EMA every ``--every`` UNet steps. ``export``
writes one snapshot as a diffusers folder. ``score`` prints, as one JSON line: the 98 base prompts, the
teal heart and the star in plain words, and the demo's textual inversion trained on that model and scored with its
new word (``--ti-steps 0`` skips it). All at ``BUILTIN_EVAL``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from sdtune.evaluate.world_eval import BUILTIN_EVAL, score_prompts
from sdtune.methods.run import run
from sdtune.models.loading import load_model
from sdtune.tools.builtin_build import Build, BuildSettings
from sdtune.tools.demo import CONCEPT, TOKEN, DemoSettings, demo_config, score_word, with_trained_word, write_dataset
from sdtune.world import base_prompts, eval_prompts


def settings_from(pairs: list[str]) -> BuildSettings:
    fields = {f.name: f.type for f in dataclasses.fields(BuildSettings)}
    values = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"{key}: not a BuildSettings field; choose one of {', '.join(fields)}")
        values[key] = float(value) if fields[key] in (float, "float") else int(value)
    return BuildSettings(**values)


def build(work: Path, phase1: Path, minutes: float, every: int, overrides: list[str]) -> None:
    fresh = not (work / "state.pt").is_file()
    b = Build(work, settings_from(overrides))
    if fresh:  # phase 2 starts from the phase-1 model: its UNet, text encoder, VAE and scaling factor
        p1 = load_model(phase1)
        for name, module in (("unet", p1.unet), ("vae", p1.vae), ("text_encoder", p1.text_encoders[0])):
            b.modules[name].load_state_dict(module.float().state_dict())
        b.configs["vae"]["scaling_factor"] = p1.vae.config.scaling_factor
        b.modules["vae"].register_to_config(scaling_factor=p1.vae.config.scaling_factor)
        b.state = {"stage": "decoder2", "step": 0, "log": []}
        b._save({})
    save = b._save

    def save_with_snapshot(extra: dict) -> None:
        save(extra)
        step = b.state["step"]
        if b.state["stage"] == "unet2" and "ema" in extra and step % every == 0:
            torch.save(
                {n: {k: v.half() for k, v in sd.items()} for n, sd in extra["ema"].items()}, work / f"ema_{step}.pt"
            )

    b._save = save_with_snapshot
    if b.run(time.time() + minutes * 60):
        final = {n: {k: v.half() for k, v in b.modules[n].state_dict().items()} for n in ("unet", "text_encoder")}
        torch.save(final, work / f"ema_{b.s.unet2_steps}.pt")
        print("phase 2 done")
    else:
        print(f"paused at stage {b.state['stage']} step {b.state['step']}; run again to resume")


def export(work: Path, snapshot: str, out: Path) -> None:
    b = Build(work, BuildSettings())
    for name, state in torch.load(work / snapshot, weights_only=True).items():
        b.modules[name].load_state_dict({k: v.float() for k, v in state.items()})
    print(b.export(out))


def score(model_dir: str, ti_steps: int) -> dict:
    model = load_model(model_dir)
    result: dict = {"model": model_dir}
    for label, prompts, per_prompt in (
        ("base98", base_prompts(98, seed=0), 1),
        ("teal_heart_words", eval_prompts(CONCEPT), 2),
        ("star_words", eval_prompts("star"), 1),
    ):
        s = score_prompts(model, prompts, BUILTIN_EVAL, seed=1000, images_per_prompt=per_prompt)
        result[label] = {"full": s.full, "shape": s.shape, "fg": s.fg, "n": s.n}
    if ti_steps:
        demo = DemoSettings(steps=ti_steps)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            data = write_dataset(root / "data", demo.images, demo.seed)
            outputs = run(
                demo_config(root, data, demo, base=model_dir, preview_every=0),
                console=Console(quiet=True),
                progress=False,
            )
            tuned = with_trained_word(load_model(model_dir), outputs)
        s = score_word(tuned, eval_prompts(CONCEPT, token=TOKEN), demo.num_vectors)
        result["ti"] = {"steps": ti_steps, "full": s.full, "shape": s.shape, "fg": s.fg, "n": s.n}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("work", type=Path)
    p.add_argument("--phase1", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=300)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="BuildSettings key=value")
    p = sub.add_parser("export")
    p.add_argument("work", type=Path)
    p.add_argument("snapshot")
    p.add_argument("out", type=Path)
    p = sub.add_parser("score")
    p.add_argument("model")
    p.add_argument("--ti-steps", type=int, default=500)
    args = parser.parse_args()
    if args.command == "build":
        build(args.work, args.phase1, args.minutes, args.every, args.overrides)
    elif args.command == "export":
        export(args.work, args.snapshot, args.out)
    else:
        print(json.dumps(score(args.model, args.ti_steps)))


if __name__ == "__main__":
    main()
