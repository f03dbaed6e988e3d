"""Build the built-in base model from scratch on the shapes world: ``sdtune builtin build``.

Recipe (all seeded; every stage saves its state, so the build can run in short pieces and resume):

1. **VAE**: train ``AutoencoderKL`` on rendered scenes (MSE + L1 reconstruction, tiny KL as in SD).
2. **Latents**: render a pool of base-training scenes (held-out concepts excluded by construction),
   encode them once with the VAE posterior mean, set the VAE scaling factor to 1 / std of the latents.
3. **UNet + text encoder**: train both jointly from scratch with SD 1.x's noise schedule and epsilon target,
   10 % empty captions (for classifier-free guidance), EMA of the weights; the EMA weights are exported.
4. **Decoder**: fine-tune the VAE decoder alone with the encoder frozen (as Stability's ft-MSE VAE did): the
   latents do not change, so the UNet stays valid, and reconstructions get sharper edges.

Stages 1-4 are the curriculum's first phase, on ``CORE_FG_COLOURS`` (teal only as a background). The second
phase adds teal as a foreground colour (never on a heart: the held-out pairing) and trains longer:

5. **Decoder 2**: the decoder alone again, now on the full base distribution (the frozen encoder already
   separates teal shapes; the phase-1 decoder drew them green).
6. **Latents 2**: a fresh pool of the full distribution, encoded with the same encoder and scaling factor.
7. **UNet 2**: continue the UNet and text encoder from phase 1's EMA weights with Min-SNR weighting
   (gamma 5), a new warm-up and cosine decay, and a fresh EMA; its EMA weights are the model.

Evaluate with ``benchmarks/builtin_quality.py`` (DDIM, the world's scorer).

This is pre-training, not a fine-tuning method, so it has its own short loop instead of ``train/``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from sdtune.core.atomic import atomic_path, write_text
from sdtune.models.builtin import BUILTIN_DIR, builtin_configs
from sdtune.models.components import SDComponents, build_modules
from sdtune.models.family import ModelFamily
from sdtune.models.folder import save_diffusers_folder
from sdtune.models.shipped import shipped_tokenizers
from sdtune.train.noise import min_snr_weights
from sdtune.world import BASE_FG_COLOURS, CORE_FG_COLOURS, base_training_examples, render


@dataclass
class BuildSettings:
    """Knobs of the build; the defaults are the committed model's recipe."""

    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    pool_size: int = 24000  # rendered base-training scenes, encoded once
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999  # reached after warm-up: decay_t = min(ema_decay, (1 + t) / (10 + t))
    decoder_steps: int = 1000  # then the VAE decoder alone is fine-tuned on the frozen encoder's latents
    decoder_lr: float = 5e-4
    # phase 2: the full base distribution (teal foregrounds too), Min-SNR, longer
    decoder2_steps: int = 300
    decoder2_lr: float = 3e-4
    pool2_size: int = 24000
    unet2_steps: int = 2500
    unet2_lr: float = 3e-4
    warmup2: int = 100
    min_snr_gamma: float = 5.0
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 50


def _images_to_tensor(images: list) -> torch.Tensor:
    array = np.stack([np.asarray(img, dtype=np.float32) for img in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


class Build:
    """The resumable build of the built-in model in ``work_dir``."""

    def __init__(self, work_dir: Path, settings: BuildSettings, console: Console | None = None) -> None:
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.s = settings
        self.console = console or Console()
        self.configs = builtin_configs()
        self.tokenizer = shipped_tokenizers(ModelFamily("sd1"))[0]
        torch.manual_seed(settings.seed)
        self.modules = build_modules(self.configs)
        self.state: dict[str, Any] = {"stage": "vae", "step": 0, "log": []}
        if (self.work / "state.pt").is_file():
            self._load()

    # -- persistence -------------------------------------------------------------------------------
    def _save(self, extra: dict[str, Any]) -> None:
        payload = {
            "state": json.dumps(self.state),
            "configs": json.dumps(self.configs),
            "modules": {n: m.state_dict() for n, m in self.modules.items()},
            **extra,
        }
        with atomic_path(self.work / "state.pt") as tmp:
            torch.save(payload, tmp)

    def _load(self) -> None:
        payload = torch.load(self.work / "state.pt", weights_only=True)
        self.state = json.loads(payload["state"])
        self.configs = json.loads(payload["configs"])
        self.modules = build_modules(self.configs)
        for name, module in self.modules.items():
            module.load_state_dict(payload["modules"][name])
        self._resume_payload = payload
        self.console.print(f"resumed at stage {self.state['stage']}, step {self.state['step']}")

    # -- stages ------------------------------------------------------------------------------------
    def run(self, deadline: float) -> bool:
        """Run stages until done or past ``deadline`` (time.time()); True when the build is finished."""
        while time.time() < deadline:
            stage = self.state["stage"]
            s = self.s
            if stage == "vae":
                self._train_vae(deadline)
            elif stage == "latents":
                self._encode_pool("pool.pt", s.pool_size, s.seed + 7, CORE_FG_COLOURS, next_stage="unet")
            elif stage == "unet":
                self._train_unet(deadline, "pool.pt", s.unet_steps, s.unet_lr, s.warmup, None, next_stage="decoder")
            elif stage == "decoder":
                self._train_decoder(deadline, s.decoder_steps, s.decoder_lr, CORE_FG_COLOURS, "decoder2", salt=2)
            elif stage == "decoder2":
                self._train_decoder(deadline, s.decoder2_steps, s.decoder2_lr, BASE_FG_COLOURS, "latents2", salt=3)
            elif stage == "latents2":
                self._encode_pool("pool2.pt", s.pool2_size, s.seed + 8, BASE_FG_COLOURS, next_stage="unet2")
            elif stage == "unet2":
                self._train_unet(
                    deadline, "pool2.pt", s.unet2_steps, s.unet2_lr, s.warmup2, s.min_snr_gamma, next_stage="done"
                )
            else:
                return True
        return self.state["stage"] == "done"

    def _train_vae(self, deadline: float) -> None:
        vae, s = self.modules["vae"], self.s
        opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
        if self.state["step"] and "optimizer" in getattr(self, "_resume_payload", {}):
            opt.load_state_dict(self._resume_payload["optimizer"])
        rng = np.random.default_rng([s.seed, 1, self.state["step"]])
        t0, step = time.time(), self.state["step"]
        self._chunk_start = step
        while step < s.vae_steps and time.time() < deadline:
            scenes = list(base_training_examples(s.vae_batch, int(rng.integers(1 << 31)), CORE_FG_COLOURS))
            x = _images_to_tensor([render(scene) for scene, _ in scenes])
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            kl = posterior.kl().mean() / x[0].numel()
            loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % s.log_every == 0:
                self._log("vae", step, s.vae_steps, loss.item(), t0)
        self.state["step"] = step
        if step >= s.vae_steps:
            self.state.update(stage="latents", step=0)
            self._save({})
        else:
            self._save({"optimizer": opt.state_dict()})

    @torch.no_grad()
    def _encode_pool(self, name: str, size: int, seed: int, fg_colours: tuple[str, ...], next_stage: str) -> None:
        """Encode ``size`` scenes once; the first pool also fixes the VAE scaling factor (1 / std)."""
        vae = self.modules["vae"]
        t0 = time.time()
        examples = list(base_training_examples(size, seed, fg_colours))
        latents, captions = [], []
        for i in range(0, len(examples), 256):
            chunk = examples[i : i + 256]
            x = _images_to_tensor([render(scene) for scene, _ in chunk])
            latents.append(vae.encode(x).latent_dist.mean)
            captions += [c for _, c in chunk]
        latents_t = torch.cat(latents)
        if name == "pool.pt":
            scale = float(1.0 / latents_t.std())
            self.configs["vae"]["scaling_factor"] = scale
            vae.register_to_config(scaling_factor=scale)
        scale = float(self.configs["vae"]["scaling_factor"])
        ids = self.tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        torch.save({"latents": (latents_t * scale).to(torch.float16), "ids": ids.to(torch.int32)}, self.work / name)
        self.console.print(f"encoded {len(examples)} scenes in {time.time() - t0:.0f}s, scaling factor {scale:.4f}")
        self.state.update(stage=next_stage, step=0)
        self._save({})

    def _train_unet(
        self,
        deadline: float,
        pool_name: str,
        total: int,
        base_lr: float,
        warmup: int,
        min_snr_gamma: float | None,
        next_stage: str,
    ) -> None:
        unet, te, s = self.modules["unet"], self.modules["text_encoder"], self.s
        stage = self.state["stage"]
        pool = torch.load(self.work / pool_name, weights_only=True)
        latents, ids = pool["latents"].float(), pool["ids"].long()
        empty = self.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
        scheduler = SDComponents.noise_scheduler_from(self.configs["scheduler"])
        params = list(unet.parameters()) + list(te.parameters())
        opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=0.0)
        ema = {n: copy.deepcopy(self.modules[n]).requires_grad_(False) for n in ("unet", "text_encoder")}
        payload = getattr(self, "_resume_payload", {})
        if self.state["step"] and "optimizer" in payload:
            opt.load_state_dict(payload["optimizer"])
            for n, m in ema.items():
                m.load_state_dict(payload["ema"][n])
        salt = 0 if stage == "unet" else 7919  # phase 2 draws a different stream
        gen = torch.Generator().manual_seed(s.seed * 1000 + salt + self.state["step"])
        t0, step = time.time(), self.state["step"]
        self._chunk_start = step
        while step < total and time.time() < deadline:
            lr = base_lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, len(latents), (s.unet_batch,), generator=gen)
            x0, tokens = latents[idx], ids[idx].clone()
            drop = torch.rand(s.unet_batch, generator=gen) < s.caption_dropout
            tokens[drop] = empty
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (s.unet_batch,), generator=gen)
            pred = unet(scheduler.add_noise(x0, noise, t), t, te(tokens).last_hidden_state).sample
            if min_snr_gamma:
                per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
                loss = (per_sample * min_snr_weights(scheduler, t, min_snr_gamma)).mean()
            else:
                loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(s.ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA forgets the random init
            with torch.no_grad():
                for n, m in ema.items():
                    for pe, p in zip(m.parameters(), self.modules[n].parameters(), strict=True):
                        pe.lerp_(p, 1.0 - decay)
            step += 1
            if step % s.log_every == 0:
                self._log(stage, step, total, loss.item(), t0)
            if step % s.checkpoint_every == 0:
                self.state["step"] = step
                self._save({"optimizer": opt.state_dict(), "ema": {n: m.state_dict() for n, m in ema.items()}})
        self.state["step"] = step
        if step >= total:
            for n, m in ema.items():  # the EMA weights are the model
                self.modules[n].load_state_dict(m.state_dict())
            self.state.update(stage=next_stage, step=0)
            self._save({})
        else:
            self._save({"optimizer": opt.state_dict(), "ema": {n: m.state_dict() for n, m in ema.items()}})

    def _train_decoder(
        self, deadline: float, total: int, lr: float, fg_colours: tuple[str, ...], next_stage: str, salt: int
    ) -> None:
        vae, s, stage = self.modules["vae"], self.s, self.state["stage"]
        decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        opt = torch.optim.AdamW(decoder, lr=lr, weight_decay=0.0)
        payload = getattr(self, "_resume_payload", {})
        if self.state["step"] and "optimizer" in payload:
            opt.load_state_dict(payload["optimizer"])
        rng = np.random.default_rng([s.seed, salt, self.state["step"]])
        t0, step = time.time(), self.state["step"]
        self._chunk_start = step
        while step < total and time.time() < deadline:
            scenes = list(base_training_examples(s.vae_batch, int(rng.integers(1 << 31)), fg_colours))
            x = _images_to_tensor([render(scene) for scene, _ in scenes])
            with torch.no_grad():  # the encoder is frozen: the UNet's latents stay what it was trained on
                latents = vae.encode(x).latent_dist.mean
            recon = vae.decode(latents).sample
            loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % s.log_every == 0:
                self._log(stage, step, total, loss.item(), t0)
        self.state["step"] = step
        if step >= total:
            self.state.update(stage=next_stage, step=0)
            self._save({})
        else:
            self._save({"optimizer": opt.state_dict()})

    def _log(self, stage: str, step: int, total: int, loss: float, t0: float) -> None:
        done = step - self._chunk_start  # steps since this piece of the build started
        rate = done / max(time.time() - t0, 1e-9)
        eta = (total - step) / max(rate, 1e-9)
        self.state["log"].append({"stage": stage, "step": step, "loss": round(loss, 5)})
        self.console.print(f"{stage} step {step}/{total} loss {loss:.4f} {rate:.2f} it/s ETA {eta / 60:.1f} min")

    # -- export ------------------------------------------------------------------------------------
    def components(self) -> SDComponents:
        return SDComponents(
            family=ModelFamily("sd1"),
            unet=self.modules["unet"],
            vae=self.modules["vae"],
            text_encoders=[self.modules["text_encoder"]],
            tokenizers=[self.tokenizer],
            scheduler_config=self.configs["scheduler"],
            source="builtin-build",
        )

    def export(self, out_dir: Path = BUILTIN_DIR) -> Path:
        """Write the finished model as a fp16 diffusers folder (the committed built-in model)."""
        out = save_diffusers_folder(self.components(), out_dir, dtype=torch.float16, overwrite=True)
        for tok in ("vocab.json", "merges.txt"):  # plain BPE files: every transformers version reads them
            shutil.copy(Path(self.tokenizer.name_or_path) / tok, out / "tokenizer" / tok)
        for extra in ("tokenizer.json", "special_tokens_map.json"):
            (out / "tokenizer" / extra).unlink(missing_ok=True)
        write_text(
            out / "build.json", json.dumps({"settings": asdict(self.s), "log": self.state["log"][-40:]}, indent=1)
        )
        return out
