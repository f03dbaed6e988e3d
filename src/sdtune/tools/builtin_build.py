"""Build the built-in base model from scratch on the shapes world: ``sdtune builtin build``.

Recipe (all seeded; every stage saves its state, so the build can run in short pieces and resume):

1. **VAE**: train ``AutoencoderKL`` on rendered scenes (MSE + L1 reconstruction, tiny KL as in SD).
2. **Latents**: render a pool of base-training scenes (held-out concepts excluded by construction),
   encode them once with the VAE posterior mean, set the VAE scaling factor to 1 / std of the latents.
3. **UNet + text encoder**: train both jointly from scratch with SD 1.x's noise schedule and epsilon target,
   10 % empty captions (for classifier-free guidance), EMA of the weights; the EMA weights are exported.
4. **Decoder**: fine-tune the VAE decoder alone with the encoder frozen (as Stability's ft-MSE VAE did): the
   latents do not change, so the UNet stays valid, and reconstructions get sharper edges.
5. **Evaluate**: sample the base-prompt set with DDIM and score every image with the world's scorer.

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
from sdtune.world import base_training_examples, render


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
            if stage == "vae":
                self._train_vae(deadline)
            elif stage == "latents":
                self._encode_pool()
            elif stage == "unet":
                self._train_unet(deadline)
            elif stage == "decoder":
                self._train_decoder(deadline)
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
            scenes = list(base_training_examples(s.vae_batch, seed=int(rng.integers(1 << 31))))
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
    def _encode_pool(self) -> None:
        vae, s = self.modules["vae"], self.s
        t0 = time.time()
        examples = list(base_training_examples(s.pool_size, seed=s.seed + 7))
        latents, captions = [], []
        for i in range(0, len(examples), 256):
            chunk = examples[i : i + 256]
            x = _images_to_tensor([render(scene) for scene, _ in chunk])
            latents.append(vae.encode(x).latent_dist.mean)
            captions += [c for _, c in chunk]
        latents_t = torch.cat(latents)
        scale = float(1.0 / latents_t.std())
        self.configs["vae"]["scaling_factor"] = scale
        self.modules["vae"].register_to_config(scaling_factor=scale)
        ids = self.tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        torch.save(
            {"latents": (latents_t * scale).to(torch.float16), "ids": ids.to(torch.int32)}, self.work / "pool.pt"
        )
        self.console.print(f"encoded {len(examples)} scenes in {time.time() - t0:.0f}s, scaling factor {scale:.4f}")
        self.state.update(stage="unet", step=0)
        self._save({})

    def _train_unet(self, deadline: float) -> None:
        unet, te, s = self.modules["unet"], self.modules["text_encoder"], self.s
        pool = torch.load(self.work / "pool.pt", weights_only=True)
        latents, ids = pool["latents"].float(), pool["ids"].long()
        empty = self.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
        scheduler = SDComponents.noise_scheduler_from(self.configs["scheduler"])
        params = list(unet.parameters()) + list(te.parameters())
        opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.0)
        ema = {n: copy.deepcopy(self.modules[n]).requires_grad_(False) for n in ("unet", "text_encoder")}
        payload = getattr(self, "_resume_payload", {})
        if self.state["step"] and "optimizer" in payload:
            opt.load_state_dict(payload["optimizer"])
            for n, m in ema.items():
                m.load_state_dict(payload["ema"][n])
        gen = torch.Generator().manual_seed(s.seed * 1000 + self.state["step"])
        t0, step = time.time(), self.state["step"]
        self._chunk_start = step
        while step < s.unet_steps and time.time() < deadline:
            lr = s.unet_lr * min(1.0, (step + 1) / s.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / s.unet_steps))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, len(latents), (s.unet_batch,), generator=gen)
            x0, tokens = latents[idx], ids[idx].clone()
            drop = torch.rand(s.unet_batch, generator=gen) < s.caption_dropout
            tokens[drop] = empty
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (s.unet_batch,), generator=gen)
            pred = unet(scheduler.add_noise(x0, noise, t), t, te(tokens).last_hidden_state).sample
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
                self._log("unet", step, s.unet_steps, loss.item(), t0)
            if step % s.checkpoint_every == 0:
                self.state["step"] = step
                self._save({"optimizer": opt.state_dict(), "ema": {n: m.state_dict() for n, m in ema.items()}})
        self.state["step"] = step
        if step >= s.unet_steps:
            for n, m in ema.items():  # the EMA weights are the model
                self.modules[n].load_state_dict(m.state_dict())
            self.state.update(stage="decoder", step=0)
            self._save({})
        else:
            self._save({"optimizer": opt.state_dict(), "ema": {n: m.state_dict() for n, m in ema.items()}})

    def _train_decoder(self, deadline: float) -> None:
        vae, s = self.modules["vae"], self.s
        decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        opt = torch.optim.AdamW(decoder, lr=s.decoder_lr, weight_decay=0.0)
        payload = getattr(self, "_resume_payload", {})
        if self.state["step"] and "optimizer" in payload:
            opt.load_state_dict(payload["optimizer"])
        rng = np.random.default_rng([s.seed, 2, self.state["step"]])
        t0, step = time.time(), self.state["step"]
        self._chunk_start = step
        while step < s.decoder_steps and time.time() < deadline:
            scenes = list(base_training_examples(s.vae_batch, seed=int(rng.integers(1 << 31))))
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
                self._log("decoder", step, s.decoder_steps, loss.item(), t0)
        self.state["step"] = step
        if step >= s.decoder_steps:
            self.state.update(stage="done", step=0)
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
