"""Concept models: LoRA, DoRA, LoCon, LoHa, LoKr, OFT and BOFT adapters, trained with the base model frozen.

Recipe:
1. load the base model and freeze all of it;
2. read the images and captions, encode the images to latents once; when the text encoders are frozen and the
   captions never change, their conditioning is computed once too;
3. add peft adapters of the chosen kind to the chosen layers of the UNet (and text encoders), check that every
   target exists and that the rank (OFT/BOFT: the block size) fits the layers;
4. loss: the caption (through the template), noise at a random timestep, the adapted UNet's prediction against
   the noise (or velocity), Min-SNR weighting if configured;
5. EMA (``ema: true``): an exponential moving average of the adapter weights, as the full fine-tune keeps of its
   weights; previews, the validation loss and export use it, checkpoints hold it;
6. export: one ``.safetensors`` in kohya/LyCORIS keys with ``ss_*`` and ``modelspec.*`` metadata (A1111, ComfyUI,
   InvokeAI), or in PEFT/diffusers keys (``load_lora_weights``; a DoRA, per input column, as the exact plain LoRA
   of its merged delta, since diffusers' DoRA is per output row); then every target tool's key map is checked on
   it (header only) and ``compatibility.json`` written beside it, with a warning for each tool that would drop or
   misapply a key.
Pivotal tuning (``token:``): a new word's embedding trains with its own learning rate alongside the adapters,
is frozen after ``token_train_fraction`` of the steps, and is exported as embedding files next to the LoRA.
LoRA-DreamBooth (``dreambooth:``): class images of the class prompt, made by the base model when missing, train
beside the captions with prior preservation (:mod:`sdtune.train.prior`, shared with the DreamBooth method).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from peft.tuners.tuners_utils import BaseTunerLayer
from rich.console import Console

from sdtune.adapters.lora import adapter_state, check_rank, check_targets, inject, matching_modules, peft_config
from sdtune.adapters.oft import check_blocks, orthogonal_config
from sdtune.adapters.token_embedding import add_trainable_token, expand_token
from sdtune.config.block_weights import expand_block_weights
from sdtune.config.methods import DEFAULT_BLOCK_SIZE, LoraConfig
from sdtune.core.dtypes import cast_floats, torch_dtype
from sdtune.core.errors import ConfigError, DataError
from sdtune.data import process_caption
from sdtune.data.dataset import ImageCaptionSet
from sdtune.formats import tool_keys
from sdtune.formats.embeddings import Embedding, save_a1111_pt, save_safetensors
from sdtune.formats.hashes import a1111_short_hash
from sdtune.formats.lora_files import (
    dense_lora_from_dora,
    kohya_metadata,
    one_alpha,
    peft_diffusers_metadata,
    save_lora,
    to_kohya,
    to_peft_diffusers,
)
from sdtune.inference.generate import generate
from sdtune.inference.previews import (
    class_image_settings,
    eval_mode,
    preview_prompts,
    preview_settings,
    render_previews,
)
from sdtune.methods.regularisation import adapter_preservation
from sdtune.models.family import ModelFamily
from sdtune.models.targets import TEXT_ENCODER_TARGETS, UNET_TARGETS
from sdtune.models.text_encoding import encode_prompts
from sdtune.models.unet_blocks import UNetBlocks
from sdtune.train.ema import WeightAverage
from sdtune.train.loop import sample_rng
from sdtune.train.precision import fp8_frozen_linears
from sdtune.train.prior import PriorPreservation, class_folder
from sdtune.train.recipe import (
    ConsoleReport,
    captioning,
    checkpoint_activations,
    fp32_masters,
    frozen_base,
    held_out_loss,
    recipe_loss,
    text_cache,
    training_images,
)

CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


def adapter_configs(cfg: LoraConfig, components: dict[str, torch.nn.Module], family: ModelFamily) -> dict:
    """The peft config of each component that gets adapters (``unet``, ``text_encoder``, ``text_encoder_2`` in
    ``components``): every explicit target must exist somewhere (else the nearest layer names), the rank must fit
    the layers; components that none of the explicit targets live in get none. The UNet's block options
    (``block_dims``, ``block_alphas``, a block-wise rate of 0) become per-module ranks, alphas and exclusions."""
    if cfg.target_modules:
        try:
            check_targets(components, cfg.target_modules)
        except ValueError as exc:
            raise ConfigError(f"target_modules: {exc}") from None
    configs = {}
    for name, module in components.items():
        if cfg.target_modules:
            names = [n for n, _ in module.named_modules()]
            targets = [t for t in cfg.target_modules if any(n == t or n.endswith("." + t) for n in names)]
        else:
            targets = list((UNET_TARGETS if name == "unet" else TEXT_ENCODER_TARGETS)[cfg.targets])
        if not targets:  # explicit targets that all live in other components
            continue
        if cfg.adapter in ("oft", "boft"):  # a rotation of each layer's output channels, in blocks
            block = cfg.block_size or DEFAULT_BLOCK_SIZE[cfg.adapter]
            try:
                check_blocks(module, targets, cfg.adapter, block, cfg.butterfly_factors)
            except ValueError as exc:
                raise ConfigError(f"block_size: {name}: {exc}") from None
            configs[name] = orthogonal_config(
                cfg.adapter, block, targets, cfg.constraint or 0.0, cfg.rescaled, cfg.butterfly_factors, cfg.dropout
            )
            continue
        alpha = cfg.alpha or cfg.rank
        conv_alpha = (cfg.conv_alpha or alpha) if cfg.conv_rank else None
        conv = [t for t in targets if t in CONV_TARGETS]
        ranks, alphas, exclude = ({}, {}, []) if name != "unet" else block_ranks(cfg, module, targets, conv, family)
        if exclude:  # blocks without adapters: the targets become the full paths of the modules that get one
            left_out = set(exclude)
            matched = [p for paths in matching_modules(module, targets).values() for p in paths]
            targets = [p for p in dict.fromkeys(matched) if p not in left_out]
        try:
            check_rank(module, targets, cfg.rank, ranks)
        except ValueError as exc:
            raise ConfigError(f"{'block_dims' if ranks else 'rank'}: {name}: {exc}") from None
        configs[name] = peft_config(
            cfg.adapter, cfg.rank, alpha, targets, cfg.dropout, cfg.conv_rank, conv_alpha, conv,
            ranks=ranks, alphas=alphas,
        )  # fmt: skip
    return configs


def block_lr_weights(cfg: LoraConfig, blocks: UNetBlocks) -> list[float] | None:
    """One multiplier of the UNet adapters' rate per block (:mod:`sdtune.models.unet_blocks` order), from
    ``down_lr_weight`` / ``mid_lr_weight`` / ``up_lr_weight`` (presets expanded); ``None`` when none is set. A list
    of the wrong length for this model is a one-line :class:`ConfigError`."""
    given = {"down_lr_weight": cfg.down_lr_weight, "mid_lr_weight": cfg.mid_lr_weight, "up_lr_weight": cfg.up_lr_weight}
    if all(v is None for v in given.values()):
        return None
    counts = {"down_lr_weight": blocks.num_in, "mid_lr_weight": blocks.num_mid, "up_lr_weight": blocks.num_in}
    what = {"down_lr_weight": "input blocks", "mid_lr_weight": "middle blocks", "up_lr_weight": "output blocks"}
    lists = {}
    for field, value in given.items():
        if value is None:
            continue
        n = counts[field]
        if isinstance(value, list) and len(value) != n:
            raise ConfigError(
                f"{field}: this UNet has {n} {what[field]} ({blocks.describe()}); give {n} values "
                f"(got {len(value)}), e.g. {[1.0] * n} or a preset such as sine"
                if field != "mid_lr_weight"
                else f"{field}: this UNet's middle block counts as {n} (got {len(value)} values); e.g. {[1.0] * n}"
            )
        lists[field] = expand_block_weights(value, n)
    return blocks.lr_weights(lists.get("down_lr_weight"), lists.get("mid_lr_weight"), lists.get("up_lr_weight"))


def block_ranks(
    cfg: LoraConfig, unet: torch.nn.Module, targets: list[str], conv: list[str], family: ModelFamily
) -> tuple[dict[str, int], dict[str, float], list[str]]:
    """Per-module ranks and alphas (full module paths) from ``block_dims`` / ``block_alphas``, and the modules that
    get no adapter (a block of rank 0 or of learning-rate weight 0, as kohya leaves them out). The convolution
    targets keep ``conv_rank`` when it is set."""
    blocks = UNetBlocks.of(family, unet.config)
    weights = block_lr_weights(cfg, blocks)
    dims, block_alphas = cfg.block_dims, cfg.block_alphas
    if weights is None and dims is None:
        return {}, {}, []
    if dims is not None and len(dims) != blocks.size:
        raise ConfigError(
            f"block_dims: this {family.name} UNet has {blocks.size} blocks ({blocks.describe()}); give {blocks.size} "
            f"ranks (got {len(dims)}), e.g. {[cfg.rank] * blocks.size}"
        )
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    exclude: list[str] = []
    for suffix, paths in matching_modules(unet, targets).items():
        keeps_conv_rank = suffix in conv and cfg.conv_rank is not None
        for path in paths:
            index = blocks.index(path)
            if index is None:
                continue  # outside every block: the plain rank and rate
            zero_rate = weights is not None and weights[index] == 0
            zero_rank = dims is not None and dims[index] == 0 and not keeps_conv_rank  # kohya: convs keep conv_dim
            if zero_rate or zero_rank:
                exclude.append(path)
                continue
            if dims is None or keeps_conv_rank:
                continue
            ranks[path] = dims[index]
            alphas[path] = block_alphas[index] if block_alphas else (cfg.alpha or dims[index])
    if exclude and len(exclude) == sum(len(p) for p in matching_modules(unet, targets).values()):
        raise ConfigError("block_dims: every UNet block is at rank 0 or learning-rate weight 0; nothing would train")
    return ranks, alphas, exclude


class LoraJob:
    """The loop's view of a concept-model run (see :class:`sdtune.train.loop.Job`)."""

    initial_step = 0
    export_warnings: list[str] = []  # what the last export's compatibility check found (the loop logs them)

    def __init__(self, cfg: LoraConfig, accelerator: Accelerator, console: Console | None = None) -> None:
        self.cfg, self.console = cfg, console or Console()
        self.report = ConsoleReport(self.console)

        # 1. the base model, frozen (with fp8_base its UNet's linear layers in float8)
        self.base_path, self.model = frozen_base(cfg, accelerator, report=self.report)
        self.scheduler = self.model.noise_scheduler()
        if cfg.fp8_base:
            if accelerator.mixed_precision not in ("bf16", "fp16"):
                raise ConfigError(
                    f"fp8_base: float8 weights compute in bf16 or fp16, but train.mixed_precision resolved to "
                    f"{accelerator.mixed_precision!r} here; set train.mixed_precision: bf16"
                )
            changed = fp8_frozen_linears(self.model.unet)
            self.report.log(f"fp8_base: {changed} UNet linear layers hold float8 weights")

        # 2. data: latents once; captions through the template (default: the captions as they are)
        self.resolution, self.data, self.validation = training_images(cfg, self.model, self.report)
        self.templates, self.caption_options, fixed = captioning(cfg.data)
        frozen_text = not cfg.train_text_encoder and cfg.token is None
        self.text_cache = text_cache(self.model, cfg.data) if fixed and frozen_text else None
        self.prior = self._prior(accelerator) if cfg.dreambooth else None  # class images from the base model
        # regularisation against the base model's prediction (its own adapters switched off)
        self.preservation = adapter_preservation(self, accelerator) if cfg.preservation else None

        # 3a. pivotal tuning: a new word's rows, trained with their own rate, frozen after a fraction of the steps
        self.tables = []
        if cfg.token:
            named = any("[name]" in line for line in self.templates.lines)
            if not named and not all(cfg.token in c for c in self.data.captions):
                raise DataError(
                    f"token: {cfg.token} is in no template line and not in every caption, so it would "
                    "never be trained; write it in the captions or use a template with [name]"
                )
            try:
                self.tables = add_trainable_token(
                    self.model.tokenizers, self.model.text_encoders, cfg.token, cfg.num_vectors, cfg.init_text
                )
            except ValueError as exc:
                raise ConfigError(f"token: {exc}; choose a new word, e.g. <{cfg.name}>") from None
            self.freeze_token_at = round(cfg.token_train_fraction * cfg.train.max_steps)

        # 3b. adapters on the chosen layers; everything else stays frozen
        self.components = {"unet": self.model.unet} if cfg.train_unet else {}
        if cfg.train_text_encoder:
            self.components |= dict(zip(("text_encoder", "text_encoder_2"), self.model.text_encoders, strict=False))
        self.peft_configs = adapter_configs(cfg, self.components, self.model.family)
        self.blocks = UNetBlocks.of(self.model.family, self.model.unet.config)  # block-wise rates (kohya's)
        self.block_lr = block_lr_weights(cfg, self.blocks) if cfg.train_unet else None
        self.components = {name: self.components[name] for name in self.peft_configs}
        self.params = {}
        for name, config in self.peft_configs.items():
            with torch.random.fork_rng():  # the adapters' random init follows train.seed, not the process's history
                torch.manual_seed(cfg.train.seed + len(self.params))
                self.params[name] = fp32_masters(inject(self.components[name], config))  # over bf16/fp16 weights
        for module in self.components.values():
            module.train()
        if cfg.train.gradient_checkpointing:  # every network the loss backpropagates through
            through_text = cfg.train_text_encoder or cfg.token is not None
            encoders = dict(zip(("text_encoder", "text_encoder_2"), self.model.text_encoders, strict=False))
            checkpoint_activations({"unet": self.model.unet} | (encoders if through_text else {}))

        # 5. the EMA of the adapter weights (what previews show and export writes)
        self.ema = None
        if cfg.ema:
            token_rows = {id(t.extra) for t in self.tables}  # the pivotal token is exported as it trained
            named = {  # named as in the checkpoint's adapter state: peft's keys without the adapter name
                f"{name}.{key.replace('.default', '')}": param
                for name, module in self.components.items()
                for key, param in module.named_parameters()
                if param.requires_grad and id(param) not in token_rows
            }
            self.ema = WeightAverage(named, cfg.ema_decay)

    def averaged(self) -> contextlib.AbstractContextManager:
        """Inside the block the adapters hold the weights users get: the EMA when it is on."""
        return self.ema.applied() if self.ema else contextlib.nullcontext()

    def _prior(self, accelerator: Accelerator) -> PriorPreservation:
        """LoRA-DreamBooth: class images (rendered by the base model when missing) paired with every sample."""
        cfg, db = self.cfg, self.cfg.dreambooth
        settings = class_image_settings(cfg.preview, self.resolution)
        return PriorPreservation.prepare(
            prompt=db.class_prompt,
            weight=db.prior_loss_weight,
            count=db.num_class_images,
            folder=class_folder(db.class_data_dir, cfg.output_dir, cfg.name),
            instances=self.data,
            data=cfg.data,
            vae=self.model.vae,
            resolution=self.resolution,
            seed=cfg.train.seed,
            render=lambda prompts, seeds: generate(self.model, prompts, seeds, settings),
            accelerator=accelerator,
            log=lambda message: self.console.print(message, highlight=False, markup=False),
            report=self.report.skipped,
        )

    # -- what the loop calls -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[dict]:
        cfg = self.cfg
        base = cfg.optimizer.lr if isinstance(cfg.optimizer.lr, float) else 1.0  # string: set per step
        groups = []
        for name, params in self.params.items():
            rate = (cfg.unet_lr if name == "unet" else cfg.text_encoder_lr) or base
            if name == "unet" and self.block_lr is not None:  # block-wise rates: one group per UNet block
                groups += self._block_groups(params, rate)
            else:
                groups.append({"params": params, "lr": rate})
        if self.tables:
            groups.append({"params": [t.extra for t in self.tables], "lr": cfg.token_lr})
        return groups

    def _block_groups(self, params: list[torch.nn.Parameter], rate: float) -> list[dict]:
        """kohya's block-wise learning rate: the UNet adapters of block i train at ``rate x weight[i]``, one group
        per block (in block order; modules outside every block last, at ``rate``)."""
        by_block: dict[int | None, list[torch.nn.Parameter]] = {}
        for path, layer in self.model.unet.named_modules():
            if isinstance(layer, BaseTunerLayer):
                trained = [p for p in layer.parameters() if p.requires_grad]
                by_block.setdefault(self.blocks.index(path), []).extend(trained)
        grouped = [p for ps in by_block.values() for p in ps]
        if sorted(map(id, grouped)) != sorted(map(id, params)):
            raise RuntimeError("block-wise rates: the UNet adapters' parameters are not one per adapter layer")
        order = sorted(by_block, key=lambda i: (i is None, i or 0))
        return [
            {"params": by_block[i], "lr": rate * (1.0 if i is None else self.block_lr[i])} for i in order if by_block[i]
        ]

    def num_examples(self) -> int:
        return len(self.data)

    def prompt(self, index: int, rng: random.Random, captions: list[str] | None = None) -> str:
        cfg = self.cfg
        caption = (captions or self.data.captions)[index]
        text = self.templates.render(cfg.token or "", process_caption(caption, self.caption_options, rng), rng)
        return expand_token(text, cfg.token, cfg.num_vectors) if cfg.token else text

    def loss(self, indices: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        return self._loss(self.data, indices, generators)

    def validation_loss(self) -> float | None:
        """The loss on the validation images at fixed noise and timesteps (``None`` without validation images)."""
        if self.validation is None:
            return None
        for module in self.components.values():
            module.eval()  # no adapter dropout: the same weights must give the same value
        try:
            with self.averaged():
                return held_out_loss(self.cfg, self.scheduler, self.validation, self._loss)
        finally:
            for module in self.components.values():
                module.train()

    def _loss(self, data: ImageCaptionSet, indices, generators, timesteps=None) -> torch.Tensor:
        # masks (data.alpha_mask, mask files) weight the loss per pixel, mirrored with their latents
        batch = data.batch(indices, generators)  # (and per-sample weights of reg images, data.reg_weight)
        latents, mask, weights = batch.latents.to(self.model.unet.device), batch.mask, batch.weights
        prompts = [self.prompt(i, sample_rng(g), data.captions) for i, g in zip(indices, generators, strict=True)]
        training, instances = data is self.data, len(indices)
        snapshot = self.preservation.snapshot(generators) if self.preservation and training else []
        if self.prior and training:  # LoRA-DreamBooth (training only): a class sample per sample
            latents, prompts, generators, weights, mask = self.prior.extend(latents, prompts, generators, mask, weights)
        encode = self.text_cache if self.text_cache is not None else partial(encode_prompts, self.model)
        if self.preservation and training:  # regularisation samples against the base's prediction (adapters off)
            return self.preservation.loss(
                partial(recipe_loss, self), encode, latents, prompts, generators,
                instances=instances, snapshot=snapshot, weights=weights, mask=mask,
            )  # fmt: skip
        return recipe_loss(self, latents, encode(prompts), generators, mask=mask, timesteps=timesteps, weights=weights)

    def after_step(self, step: int) -> None:
        if self.ema:  # once per optimizer step (a resumed run's first call repeats a step already averaged)
            self.ema.update(step)
        for table in self.tables:  # pivotal token: trainable until its share of the steps is done
            table.extra.requires_grad_(step < self.freeze_token_at)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            f"{name}.{key}": value
            for name, module in self.components.items()
            for key, value in adapter_state(module).items()
        }
        state |= {f"token.{i}": t.extra.detach().cpu().clone() for i, t in enumerate(self.tables)}
        return state | (self.ema.state_dict() if self.ema else {})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        for name, module in self.components.items():
            prefix = name + "."
            set_peft_model_state_dict(module, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        with torch.no_grad():
            for i, table in enumerate(self.tables):
                table.extra.copy_(state[f"token.{i}"])
        if self.ema:
            self.ema.load_state_dict(state)

    # -- outputs -------------------------------------------------------------------------------------
    def export(self, out_dir: Path, step: int) -> list[Path]:
        cfg, family = self.cfg, self.model.family
        dtype = torch_dtype(cfg.save.dtype)
        with self.averaged():
            states = {name: adapter_state(module) for name, module in self.components.items()}
        path = Path(out_dir) / f"{cfg.name}.safetensors"
        outputs = [path] + self._export_token(Path(out_dir), step)
        if cfg.file_format == "peft":  # DoRA per input column: diffusers gets the exact dense LoRA of its delta
            states, configs = dense_lora_from_dora(states, self.peft_configs, self.components)
            states = {name: cast_floats(state, dtype) for name, state in states.items()}
            save_lora(path, to_peft_diffusers(states, family), peft_diffusers_metadata(configs))
            self._check_compatibility([path])
            return outputs
        if cfg.block_dims is None:
            states = {name: cast_floats(state, dtype) for name, state in states.items()}
        training = {
            "ss_output_name": cfg.name,
            "ss_steps": step,
            "ss_num_train_images": len(self.data),
            "ss_learning_rate": cfg.optimizer.lr,
            "ss_unet_lr": cfg.unet_lr,
            "ss_text_encoder_lr": cfg.text_encoder_lr,
            "ss_resolution": f"({self.resolution}, {self.resolution})",
            "ss_sd_model_name": self.base_path.name,
            "ss_network_dropout": cfg.dropout,
            "ss_seed": cfg.train.seed,
            **_noise_metadata(cfg),
            "ss_tag_frequency": json.dumps({"data": _tag_frequency(self.data.captions)}),
        }
        if self.base_path.is_file():
            training["sshs_model_hash_base"] = a1111_short_hash(self.base_path)
        algo = "locon" if cfg.adapter == "lora" and cfg.targets == "all" else cfg.adapter
        rank, alpha, args = cfg.rank, cfg.alpha or cfg.rank, {}
        if cfg.adapter in ("oft", "boft"):  # LyCORIS: dim = block size, alpha = constraint (network_args too)
            rank, alpha = cfg.block_size or DEFAULT_BLOCK_SIZE[cfg.adapter], cfg.constraint or 0.0
            args = {"constraint": str(alpha), "rescaled": str(cfg.rescaled)}
        metadata = kohya_metadata(
            family,
            algo,
            rank,
            alpha,
            {k: str(v) for k, v in training.items() if v is not None},
            conv_rank=cfg.conv_rank,
            conv_alpha=cfg.conv_alpha,
            title=cfg.name,
            network_args=args | _block_args(cfg),
        )
        tensors = to_kohya(states, self.peft_configs, family, self.model.unet.config)
        if cfg.block_dims is not None:  # per-block alphas: one alpha in the file (diffusers' converter), then cast
            tensors = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in one_alpha(tensors).items()}
        save_lora(path, tensors, metadata)
        self._check_compatibility([path])
        return outputs

    def _check_compatibility(self, paths: list[Path]) -> None:
        """Which keys A1111 / ComfyUI / InvokeAI / diffusers would drop or misapply, from the files' headers and this
        model's modules: ``compatibility.json`` beside the files, a warning line per problem."""
        modules = tool_keys.model_modules(self.model.modules(), self.model.family)
        per_block = int(self.model.unet.config.layers_per_block)
        results = []
        for path in paths:
            reports = tool_keys.check_keys(tool_keys.header_shapes(path), modules, layers_per_block=per_block)
            results.append({"file": str(path), "ok": all(r.ok for r in reports.values()), "targets": reports})
        tool_keys.write_compatibility(paths[0].parent, results)
        self.export_warnings = [line for result in results for line in tool_keys.warnings_of(result)]

    def _export_token(self, out_dir: Path, step: int) -> list[Path]:
        """The pivotal token as embedding files (its name is the trigger word in A1111/ComfyUI)."""
        if not self.tables:
            return []
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", self.cfg.token).strip("-.") or f"{self.cfg.name}-token"
        keys = ("clip_l", "clip_g") if self.model.family.arch == "sdxl" else ("text_encoder",)
        vectors = {k: t.extra.detach().cpu().float().clone() for k, t in zip(keys, self.tables, strict=True)}
        emb = Embedding(stem, vectors, step, None, self.base_path.stem)
        paths = [out_dir / f"{stem}.safetensors"]
        save_safetensors(emb, paths[0])
        if self.model.family.arch != "sdxl":
            paths.append(out_dir / f"{stem}.pt")
            save_a1111_pt(emb, paths[-1])
        return paths

    # -- evaluation (sdtune.methods.evaluation) ---------------------------------------------------------
    @contextlib.contextmanager
    def users_model(self):
        """The model as users get it: adapters in eval mode (no dropout), the EMA weights when the run keeps them."""
        with eval_mode(self.components.values()), self.averaged():
            yield self.model

    def model_prompts(self, prompts: list[str]) -> list[str]:
        if not self.cfg.token:
            return list(prompts)
        return [expand_token(q, self.cfg.token, self.cfg.num_vectors) for q in prompts]

    def preview(self, out_dir: Path, step: int) -> tuple[list[Path], Path | None]:
        p = self.cfg.preview
        prompts = preview_prompts(p, self.templates, self.data.captions, name=self.cfg.token or "")
        seeds = [p.seed + i for i in range(len(prompts))]
        settings = preview_settings(p, self.resolution)
        with self.users_model() as model:
            shown, prompts = prompts, self.model_prompts(prompts)
            return render_previews(model, prompts, shown, seeds, settings, out_dir, self.base_path.stem)


def _noise_metadata(cfg: LoraConfig) -> dict[str, object]:
    """The noise and loss options under sd-scripts' ``ss_*`` names (``train_network.py``), as it writes them."""
    t = cfg.train
    return {
        "ss_noise_offset": t.noise_offset or None,
        "ss_multires_noise_iterations": t.multires_noise_iterations or None,
        "ss_multires_noise_discount": t.multires_noise_discount,
        "ss_zero_terminal_snr": t.zero_terminal_snr,
        "ss_min_snr_gamma": t.min_snr_gamma,
        "ss_ip_noise_gamma": t.input_perturbation or None,
        "ss_debiased_estimation": t.debiased_estimation,
    }


def _block_args(cfg: LoraConfig) -> dict[str, str]:
    """The block options as sd-scripts' ``--network_args`` write them (comma-separated numbers or a preset name)."""
    out = {}
    for field in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas"):
        value = getattr(cfg, field)
        if value is not None:
            out[field] = value if isinstance(value, str) else ",".join(f"{v:g}" for v in value)
    return out


def _tag_frequency(captions: list[str]) -> dict[str, int]:
    """kohya's ``ss_tag_frequency`` for one dataset: how often each comma-separated tag occurs."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def setup(cfg: LoraConfig, accelerator: Accelerator, console: Console | None = None) -> LoraJob:
    """Build the job for ``cfg`` (loads model and data, adds the adapters; one-line errors for bad input)."""
    return LoraJob(cfg, accelerator, console)
