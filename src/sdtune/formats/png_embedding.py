"""Embeddings stored inside a preview image, as AUTOMATIC1111's "Save images with embedding in PNG chunks".

Format source: AUTOMATIC1111 ``modules/textual_inversion/image_embedding.py`` (re-implemented from its
description). The payload is the A1111 ``.pt`` dict (:func:`sdtune.formats.embeddings.a1111_dict`) as JSON with
every tensor written as ``{"TORCHTENSOR": nested list}``, stored twice:

1. a ``tEXt`` chunk ``sd-ti-embedding`` holding base64 of the JSON;
2. in the pixels, which survive tools that drop text chunks (but not lossy re-encoding):
   ``zlib.compress(json, 9)`` split into low and high nibbles, each cyclically resized to ``(H, -1, 3)``,
   XOR'd with a cosmetic dot pattern (high nibble of each byte only) and with an LCG stream ``& 0x0F``, laid
   out ``low block | black column | preview | black column | high block``.

Only the A1111 dict is representable, so SDXL (clip_l + clip_g) embeddings are refused.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from sdtune.core.atomic import atomic_path
from sdtune.core.errors import DataError
from sdtune.formats.embeddings import SINGLE, Embedding, a1111_dict, embedding_from_dict

TEXT_KEY = "sd-ti-embedding"
TENSOR_KEY = "TORCHTENSOR"
_M, _A, _C = 2**32, 1664525, 1013904223  # Numerical Recipes LCG, seed 0, as A1111 uses
_CHANNELS = 3


def lcg(m: int = _M, a: int = _A, c: int = _C, seed: int = 0) -> Iterator[int]:
    """A1111's LCG: each step ``seed = (a * seed + c) % m`` yields ``seed % 255`` (253, 242, 127, 44, ...)."""
    while True:
        seed = (a * seed + c) % m
        yield seed % 255


def lcg_stream(n: int) -> np.ndarray:
    """The first ``n`` outputs of :func:`lcg` as uint8, computed by doubling instead of a Python loop.

    If ``f(s) = A s + C`` maps each seed ``k`` steps ahead, ``f(f(s)) = A^2 s + (A C + C)`` maps ``2k`` ahead;
    uint64 products of values below 2**32 cannot overflow.
    """
    seeds = np.array([_C % _M], dtype=np.uint64)
    mul, add = _A, _C
    while len(seeds) < n:
        seeds = np.concatenate([seeds, (seeds * np.uint64(mul) + np.uint64(add)) % np.uint64(_M)])
        mul, add = mul * mul % _M, (mul * add + add) % _M
    return (seeds[:n] % 255).astype(np.uint8)


def _xor_lcg(block: np.ndarray) -> np.ndarray:
    # Row-major order of the (H, w, 3) block is the payload's byte order, so encode and decode agree.
    return block ^ (lcg_stream(block.size).reshape(block.shape) & 0x0F)


def _to_json(data: dict[str, Any]) -> bytes:
    def encode(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return {TENSOR_KEY: obj.detach().cpu().numpy().tolist()}  # float32 -> exact Python floats
        raise TypeError(f"cannot store {type(obj).__name__} in an embedding image")

    return json.dumps(data, default=encode).encode("utf-8")


def _from_json(raw: bytes | str) -> Any:
    def decode(obj: dict[str, Any]) -> Any:
        return torch.tensor(obj[TENSOR_KEY], dtype=torch.float32) if TENSOR_KEY in obj else obj

    return json.loads(raw, object_hook=decode)


def _padded_size(n: int, height: int) -> int:
    # A1111's sizes: the next multiple of H above n, then the next multiple of 3H above that (always pads).
    size = (n // height + 1) * height
    return (size // (height * _CHANNELS) + 1) * height * _CHANNELS


def _shades(vec: torch.Tensor) -> np.ndarray:
    # Dot brightness from |first vector| (first <= 1024 values) scaled to 0..255: each embedding looks different.
    mags = vec[0, :1024].detach().abs().double().cpu().numpy()
    top = mags.max() if mags.size else 0.0
    return (mags / top * 255).astype(np.uint8) if top > 0 else np.zeros(max(mags.size, 1), np.uint8)


def _dots(shape: tuple[int, ...], shades: Sequence[int]) -> np.ndarray:
    """The visible dot pattern: 6 px discs on an 8 px grid (odd rows shifted 4 px), shaded in turn.

    Only the high nibble is kept, so it never touches the payload's low nibbles.
    """
    height, width = shape[0], shape[1]
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    i = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            dx = 4 if row % 2 == 0 else 0
            shade = int(shades[i % len(shades)])
            i += 1
            draw.ellipse((x + dx, y, x + dx + 6, y + 6), fill=(shade, shade, shade))
    return np.asarray(canvas, dtype=np.uint8) & 0xF0


def caption_preview(image: Image.Image, title: str, left: str = "", mid: str = "", right: str = "") -> Image.Image:
    """Overlay a title (top) and a three-part footer (bottom) in PIL's default font; cosmetic only."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    w, h = out.size
    try:
        font: Any = ImageFont.load_default(size=max(8, min(w, h) // 16))
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed-size bitmap font
        font = ImageFont.load_default()
    pad = max(1, h // 64)
    style = {"font": font, "fill": (255, 255, 255), "stroke_width": 1, "stroke_fill": (0, 0, 0)}
    # Positions from text boxes rather than anchors: the bitmap fallback font does not support anchors.
    for text, align, top in ((title, 0.5, True), (left, 0.0, False), (mid, 0.5, False), (right, 1.0, False)):
        if text:
            x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font, stroke_width=1)
            x = pad + align * (w - 2 * pad - (x1 - x0)) - x0
            y = pad - y0 if top else h - pad - y1
            draw.text((x, y), text, **style)
    return out


def embed_in_png(emb: Embedding, preview: Image.Image, caption: bool = True) -> Image.Image:
    """Return ``low block | black | preview | black | high block`` carrying ``emb`` in its pixels.

    Source: AUTOMATIC1111 ``image_embedding.py`` (``insert_image_data_embed``; caption as
    ``caption_image_overlay``). Save it as PNG with the tEXt chunk: :func:`save_png_embedding` does both.
    """
    data = a1111_dict(emb)
    image = preview.convert("RGB")
    if caption:
        footer = f"[{emb.sd_checkpoint}]" if emb.sd_checkpoint else ""
        right = f"{emb.num_vectors}v {emb.step}s"
        image = caption_preview(image, f"<{emb.name}>", emb.sd_checkpoint_name or "", footer, right)
    height = image.height
    payload = np.frombuffer(zlib.compress(_to_json(data), level=9), dtype=np.uint8)
    size = _padded_size(payload.size, height)
    shades = _shades(emb.vectors[SINGLE])
    blocks = []
    for nibbles, seq in ((payload & 0x0F, shades), (payload >> 4, shades[::-1])):
        block = np.resize(nibbles, size).reshape(height, -1, _CHANNELS)  # np.resize repeats cyclically
        blocks.append(_xor_lcg(block ^ _dots(block.shape, seq)))
    low, high = (Image.fromarray(b, mode="RGB") for b in blocks)
    out = Image.new("RGB", (low.width + 1 + image.width + 1 + high.width, height), (0, 0, 0))
    out.paste(low, (0, 0))
    out.paste(image, (low.width + 1, 0))
    out.paste(high, (low.width + 1 + image.width + 1, 0))
    return out


def save_png_embedding(emb: Embedding, preview: Image.Image, path: str | Path, caption: bool = True) -> None:
    """Write ``emb`` as an A1111 embedding PNG atomically: pixel payload plus the ``sd-ti-embedding`` tEXt chunk.

    Source: AUTOMATIC1111 ``modules/textual_inversion/textual_inversion.py`` (``train_embedding``, "Save images
    with embedding in PNG chunks"). SDXL embeddings raise a :class:`DataError` (A1111's dict has one encoder).
    """
    data = a1111_dict(emb, where=str(path))
    image = embed_in_png(emb, preview, caption=caption)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(_to_json(data)).decode("ascii"))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def _crop_black(arr: np.ndarray) -> np.ndarray:
    # Only rows/columns that are pure (0, 0, 0) go: stricter tests could eat payload pixels that happen to
    # have a zero channel.
    lit = arr.any(axis=2)
    cols, rows = np.flatnonzero(lit.any(axis=0)), np.flatnonzero(lit.any(axis=1))
    if cols.size == 0:
        return arr[:0, :0]
    return arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _extract_pixels(image: Image.Image) -> Any | None:
    """Decode the pixel payload (A1111 ``extract_image_data_embed``); None where there is none."""
    arr = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    zero_cols = np.flatnonzero(~arr.any(axis=(0, 2)))  # the separators, plus any dark preview columns
    if zero_cols.size < 2:
        return None
    low, high = arr[:, : zero_cols.min()], arr[:, zero_cols.max() + 1 :]
    if low.size == 0 or low.shape != high.shape:
        return None
    raw = ((_xor_lcg(high) << 4) | _xor_lcg(low)).tobytes()
    inflater = zlib.decompressobj()  # the cyclic padding after the stream is ignored
    try:
        text = inflater.decompress(raw)
    except zlib.error:
        return None
    if not inflater.eof:
        return None
    try:
        return _from_json(text)
    except (ValueError, TypeError):  # decompressed but not our JSON: not an embedding image
        return None


def _read_image(image: Image.Image, source: str, name: str | None) -> Embedding | None:
    text = getattr(image, "text", None) or image.info  # PNG text chunks; WEBP/in-memory images have none
    chunk = text.get(TEXT_KEY)
    if chunk is not None:
        try:
            data = _from_json(base64.b64decode(chunk, validate=False))
        except (ValueError, TypeError):
            raise DataError(f"{source}: the {TEXT_KEY} text chunk is not base64 JSON; re-save the embedding") from None
    else:
        data = _extract_pixels(image)
        if data is None:
            return None  # a plain preview image
    return embedding_from_dict(data, source, name=name)


def read_png_embedding(path_or_image: str | Path | Image.Image, name: str | None = None) -> Embedding | None:
    """Read an embedding from an A1111 embedding image: the tEXt chunk first, else the pixel payload.

    Source: AUTOMATIC1111 ``modules/textual_inversion/textual_inversion.py`` (``load_from_file``) and
    ``image_embedding.py``. Returns None for an image with neither (a plain preview). The name is ``name``,
    else the embedded ``name``, else the file stem.
    """
    if isinstance(path_or_image, Image.Image):
        source = getattr(path_or_image, "filename", "") or "<image>"
        return _read_image(path_or_image, source, name)
    try:
        with Image.open(path_or_image) as image:
            image.load()
            return _read_image(image, str(path_or_image), name)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path_or_image}: not a readable image ({exc}); expected a PNG or WEBP") from None
