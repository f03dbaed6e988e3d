"""Turning prompts into UNet conditioning, per family: the one place that knows which hidden states to use.

- SD 1.x / 2.x: the text encoder's last hidden state (SD 2.x's shipped encoder already stops at the penultimate
  OpenCLIP layer, so its "last" is OpenCLIP's penultimate, as in the original).
- SDXL: the penultimate hidden state of both encoders, concatenated, plus the second encoder's pooled projection
  and the size/crop "time ids" (original size, crop top-left, target size).
This matches what diffusers' pipelines feed the UNet, so training and generation see the same conditioning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass

import torch

from sdtune.models.components import SDComponents


@dataclass
class Conditioning:
    context: torch.Tensor  # [B, tokens, cross_attention_dim]
    pooled: torch.Tensor | None = None  # SDXL: [B, projection_dim]

    def unet_kwargs(self, height: int, width: int) -> dict:
        """Extra UNet arguments (SDXL's added conditions) for images of ``height`` x ``width`` pixels."""
        if self.pooled is None:
            return {}
        batch = self.context.shape[0]
        time_ids = torch.tensor(
            [height, width, 0, 0, height, width], dtype=self.context.dtype, device=self.context.device
        )
        return {"added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": time_ids.expand(batch, 6)}}


def tokenize(components: SDComponents, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Token ids per tokenizer, padded/truncated to the 77-token window."""
    out = []
    for tokenizer in components.tokenizers:
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(ids)
    return out


def encode_tokens(components: SDComponents, ids: Sequence[torch.Tensor]) -> Conditioning:
    """UNet conditioning from token ids (gradients flow; callers decide about no_grad)."""
    device = components.text_encoders[0].device
    if components.family.arch != "sdxl":
        return Conditioning(components.text_encoders[0](ids[0].to(device)).last_hidden_state)
    hidden, pooled = [], None
    for encoder, token_ids in zip(components.text_encoders, ids, strict=True):
        result = encoder(token_ids.to(device), output_hidden_states=True)
        hidden.append(result.hidden_states[-2])
        pooled = result[0]  # the last encoder's projected pooled output (text_embeds)
    return Conditioning(torch.cat(hidden, dim=-1), pooled)


def encode_prompts(components: SDComponents, prompts: Sequence[str]) -> Conditioning:
    return encode_tokens(components, tokenize(components, prompts))


class TextCache:
    """Conditioning of fixed prompts computed once, for runs whose text encoders are frozen.

    Captions that never change (no shuffling, dropout or trained tokens) give the same conditioning every step,
    so it is computed on first use and kept (on CPU); ``encoded`` counts prompts that went through the encoders.
    ``store`` keeps the results (default: a dict in memory); any mapping prompt -> ``(context, pooled | None)`` with
    ``in``, ``[]`` and ``[] =`` works, e.g. :class:`sdtune.data.disk_cache.DiskTextStore` to reuse them across runs.
    """

    def __init__(self, components: SDComponents, store: MutableMapping | None = None) -> None:
        self.components = components
        self.store: MutableMapping[str, tuple[torch.Tensor, torch.Tensor | None]] = {} if store is None else store
        self.encoded = 0
        self.encoders_ready: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        """Entered around each encoding of prompts not yet cached (e.g. to bring parked encoders back)."""

    def fill(self, prompts: Iterable[str]) -> None:
        """Encode every prompt of ``prompts`` not yet cached, in batches of 16."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.store]
        for start in range(0, len(missing), 16):
            self._encode(missing[start : start + 16])

    @torch.no_grad()
    def _encode(self, missing: list[str]) -> None:
        with self.encoders_ready():
            cond = encode_prompts(self.components, missing)
        for i, prompt in enumerate(missing):
            pooled = cond.pooled[i].cpu() if cond.pooled is not None else None
            self.store[prompt] = (cond.context[i].cpu(), pooled)
        self.encoded += len(missing)

    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.store]
        if missing:
            self._encode(missing)
        device = self.components.unet.device
        context = torch.stack([self.store[p][0] for p in prompts]).to(device)
        pooled = [self.store[p][1] for p in prompts]
        return Conditioning(context, torch.stack(pooled).to(device) if pooled[0] is not None else None)
