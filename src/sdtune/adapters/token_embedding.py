"""New tokens for textual inversion: a frozen token table plus a small trainable table for the new rows.

The original vocabulary's rows are never touched (they are not even parameters the optimizer sees), so "every
other embedding row is unchanged" holds by construction, and the optimizer updates n x width numbers instead of
the whole 49,408-row table (what diffusers' example does, restoring the other rows after each step).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import CLIPTokenizer


class ExtendedEmbedding(nn.Module):
    """``base`` (frozen, ids < V) followed by ``extra`` (trainable, ids V .. V+n-1)."""

    def __init__(self, base: nn.Embedding, num_new: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.extra = nn.Parameter(
            torch.zeros(num_new, base.embedding_dim, dtype=torch.float32, device=base.weight.device)
        )

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_base(self) -> int:
        return self.base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """The full table (copies; for inspection and export, not for the forward pass)."""
        return torch.cat([self.base.weight, self.extra.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.num_base
        out = self.base(ids.clamp(max=self.num_base - 1))
        if bool(new.any()):
            rows = self.extra[(ids - self.num_base).clamp(min=0)].to(out.dtype)
            out = torch.where(new.unsqueeze(-1), rows, out)
        return out


def token_names(token: str, num_vectors: int) -> list[str]:
    """The tokens one multi-vector embedding occupies: ``tok``, ``tok_1`` ... (diffusers' convention)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_token(prompt: str, token: str, num_vectors: int) -> str:
    """Write a multi-vector token out in full: ``a <x> cat`` -> ``a <x> <x>_1 <x>_2 cat``."""
    if num_vectors == 1:
        return prompt
    return re.sub(re.escape(token) + r"(?!_\d)", " ".join(token_names(token, num_vectors)), prompt)


def add_tokens(tokenizer: CLIPTokenizer, names: list[str]) -> list[int]:
    """Add ``names`` to the tokenizer; ids are consecutive after the base vocabulary.

    A name that already is one token (a vocabulary word such as ``cat``, or an added token) is refused: training
    it would shadow a word the model knows.
    """
    ids = []
    for name in names:
        existing = tokenizer(name, add_special_tokens=False).input_ids
        if len(existing) == 1 or name in tokenizer.get_added_vocab():
            raise ValueError(f"'{name}' is already in the tokenizer's vocabulary (id {existing[0]})")
        tokenizer.add_tokens(name)
        ids.append(tokenizer.convert_tokens_to_ids(name))
    return ids


def install(text_encoder: nn.Module, num_new: int) -> ExtendedEmbedding:
    """Replace the encoder's token table with an :class:`ExtendedEmbedding` holding ``num_new`` new rows."""
    base = text_encoder.get_input_embeddings()
    if isinstance(base, ExtendedEmbedding):
        raise ValueError("this text encoder already has trainable token rows")
    extended = ExtendedEmbedding(base, num_new)
    text_encoder.set_input_embeddings(extended)
    return extended


def a1111_init(table: torch.Tensor, init_ids: list[int], num_vectors: int) -> torch.Tensor:
    """AUTOMATIC1111's initialisation: vector i = embedding of init token ``i * L // n`` (L init tokens)."""
    vectors = torch.zeros(num_vectors, table.shape[1], dtype=torch.float32)
    if init_ids:
        for i in range(num_vectors):
            vectors[i] = table[init_ids[i * len(init_ids) // num_vectors]].float()
    return vectors


def apply_embedding(
    tokenizers: list[CLIPTokenizer], encoders: list[nn.Module], token: str, vectors: list[torch.Tensor]
) -> list[str]:
    """Make ``token`` usable in prompts: add its tokens and rows (one vector set per text encoder).

    Returns the token names; prompts must spell multi-vector tokens out (:func:`expand_token`).
    """
    names = token_names(token, vectors[0].shape[0])
    for tokenizer, encoder, vecs in zip(tokenizers, encoders, vectors, strict=True):
        add_tokens(tokenizer, names)
        table = install(encoder, len(names))
        with torch.no_grad():
            table.extra.copy_(vecs.to(table.extra.dtype))
        table.requires_grad_(False)
    return names


def add_trainable_token(
    tokenizers: list[CLIPTokenizer], encoders: list[nn.Module], token: str, num_vectors: int, init_text: str
) -> list[ExtendedEmbedding]:
    """Add ``token`` (``num_vectors`` rows) to every tokenizer/encoder pair, initialised by A1111's rule.

    Returns one trainable table per text encoder. Raises ``ValueError`` if the token is already a word.
    """
    names = token_names(token, num_vectors)
    tables = []
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        table_before = encoder.get_input_embeddings().weight.detach().cpu()
        ids = (
            tokenizer(init_text, add_special_tokens=False, truncation=True, max_length=num_vectors).input_ids
            if init_text
            else []
        )
        add_tokens(tokenizer, names)
        table = install(encoder, num_vectors)
        with torch.no_grad():
            table.extra.copy_(a1111_init(table_before, ids, num_vectors))
        tables.append(table)
    return tables
