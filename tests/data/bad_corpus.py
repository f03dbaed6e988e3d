"""A dataset folder full of bad and unusual files, for the dataset check and the loader tests.

:func:`build_corpus` writes it and returns what each file is, so tests can compare the check's findings
and the loader's choices with an exact expected mapping.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

LONG_CAPTION = ", ".join(f"a small red circle number {i}" for i in range(20))  # ~140 CLIP tokens


def pattern(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A distinct picture per seed (gradient + shapes): far apart in perceptual hash for different seeds."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx / w + np.sin(angle) * yy / h
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    arr = c0[None, None] * (1 - ramp[..., None]) + c1[None, None] * ramp[..., None]
    im = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, max(11, w // 2))), y0 + int(rng.integers(10, max(11, h // 2)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return im


def noise(seed: int, size: int = 96) -> Image.Image:
    # Noise does not compress, so cutting the file in half really cuts pixel data.
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor a header that lies about its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def _encoded(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@dataclass
class Corpus:
    """What :func:`build_corpus` wrote: expected finding kinds per file name, and what training does."""

    root: Path
    kinds: dict[str, set[str]] = field(default_factory=dict)  # file name -> exact set of expected kinds
    good: list[str] = field(default_factory=list)  # images with no finding at all
    skipped_by_training: set[str] = field(default_factory=set)
    used_by_training: set[str] = field(default_factory=set)
    reads_denied: bool = True  # False when running as root: chmod 000 does not stop reads

    def expect(self, name: str, *kinds: str) -> None:
        self.kinds[name] = set(kinds)


def build_corpus(root: Path) -> Corpus:
    """Write the bad corpus into ``root`` (created) and return the expected mapping."""
    root.mkdir(parents=True, exist_ok=True)
    c = Corpus(root)

    def image(name: str, data: bytes, caption: str | bytes | None = "a picture", *kinds: str) -> None:
        (root / name).write_bytes(data)
        if caption is not None:
            side = root / (Path(name).stem + ".txt")
            side.write_bytes(caption.encode() if isinstance(caption, str) else caption)
        c.expect(name, *kinds)

    def used(name: str, data: bytes, *kinds: str, caption: str | bytes | None = "a picture") -> None:
        image(name, data, caption, *kinds)
        c.used_by_training.add(name)
        if not kinds:
            c.good.append(name)

    def skipped(name: str, data: bytes, kind: str) -> None:
        image(name, data, "a broken picture", kind)
        c.skipped_by_training.add(name)

    # good files, in every format training reads (and an upper-case suffix)
    used("good_a.png", _encoded(pattern(1), "PNG"))
    used("good_b.jpg", _encoded(pattern(2), "JPEG", quality=95))
    used("good_c.webp", _encoded(pattern(3), "WEBP", lossless=True))
    used("good_d.bmp", _encoded(pattern(4), "BMP"))
    used("UPPER.PNG", _encoded(pattern(5), "PNG"))
    used("dup_a.png", _encoded(pattern(6), "PNG"))
    used("near_a.png", _encoded(pattern(7), "PNG"))

    # broken: training skips them
    jpeg = _encoded(noise(11), "JPEG", quality=95)
    skipped("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    png = _encoded(noise(12), "PNG")
    skipped("truncated.png", png[: len(png) // 2], "truncated")
    skipped("zero.png", b"", "zero_byte")
    skipped("text.png", b"this is a text file, not a picture\n", "not_an_image")
    # a valid header over a pixel stream that is not zlib data
    good_header = png_bytes(32, 32, 8, 2, bytes(32 * (1 + 32 * 3)))
    ihdr_end = 8 + 25
    skipped(
        "corrupt.png",
        good_header[:ihdr_end] + _chunk(b"IDAT", b"\x00not zlib at all" * 8) + _chunk(b"IEND", b""),
        "corrupt",
    )
    # a header claiming 100000 x 100000 pixels: Pillow refuses it before decoding (the file is tiny)
    skipped("bomb.png", png_bytes(100_000, 100_000, 8, 0, b"\x00" * 10), "decompression_bomb")

    # used, with a conversion
    used("tiny.png", _encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "too_small")
    used("cmyk.jpg", _encoded(pattern(8).convert("CMYK"), "JPEG", quality=95), "cmyk")
    grey16 = (np.asarray(pattern(9).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    used("sixteen.png", _encoded(Image.fromarray(grey16), "PNG"), "high_bit_depth", "grayscale")
    rgb16 = (np.asarray(pattern(10), dtype=np.uint16) * 257).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    used("rgb16.png", png_bytes(96, 96, 16, 2, rows), "high_bit_depth")
    pal = pattern(13).quantize(16)
    used("palette_alpha.png", _encoded(pal, "PNG", transparency=0), "palette", "alpha")
    used("palette.png", _encoded(pattern(14).quantize(16), "PNG"), "palette")
    rotated = pattern(15)
    exif = rotated.getexif()
    exif[0x0112] = 6
    used("rotated.jpg", _encoded(rotated, "JPEG", quality=95, exif=exif), "exif_rotated")
    used("wide.png", _encoded(pattern(16, (400, 64)), "PNG"), "extreme_aspect")
    used("grey.png", _encoded(pattern(17).convert("L"), "PNG"), "grayscale")
    la = pattern(18).convert("LA")
    la.putalpha(Image.linear_gradient("L").resize(la.size))
    used("la.png", _encoded(la, "PNG"), "grayscale", "alpha")
    rgba = pattern(19).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    used("rgba.png", _encoded(rgba, "PNG"), "alpha")
    used("bilevel.png", _encoded(pattern(20).convert("1"), "PNG"), "grayscale")
    frames = [pattern(21), pattern(22)]
    used(
        "animated.webp", _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True), "animated"
    )

    # captions
    used("nonutf8.png", _encoded(pattern(23), "PNG"), "caption_not_utf8", caption=b"caf\xe9 au lait")
    used("empty_caption.png", _encoded(pattern(24), "PNG"), "empty_caption", caption=" \n")
    used("no_caption.png", _encoded(pattern(25), "PNG"), "missing_caption", caption=None)
    used("long_caption.png", _encoded(pattern(26), "PNG"), "caption_too_long", caption=LONG_CAPTION)

    # duplicates: the same bytes, and a brightened re-encode
    used("dup_b.png", (root / "dup_a.png").read_bytes(), "exact_duplicate")
    brighter = ImageEnhance.Brightness(pattern(7)).enhance(1.05)
    used("near_b.jpg", _encoded(brighter, "JPEG", quality=90), "near_duplicate")

    # file-system oddities
    os.symlink("loop.png", root / "loop.png")
    c.expect("loop.png", "symlink_loop")
    c.skipped_by_training.add("loop.png")
    os.symlink("nowhere.png", root / "dangling.png")
    c.expect("dangling.png", "broken_symlink")
    c.skipped_by_training.add("dangling.png")
    locked = root / "locked.png"
    locked.write_bytes(_encoded(pattern(27), "PNG"))
    (root / "locked.txt").write_text("a locked picture")
    locked.chmod(0)
    try:
        locked.read_bytes()
        c.reads_denied = False  # root: permissions do not stop reads
        c.expect("locked.png")
        c.used_by_training.add("locked.png")
        c.good.append("locked.png")
    except PermissionError:
        c.expect("locked.png", "unreadable")
        c.skipped_by_training.add("locked.png")
    (root / ".hidden.png").write_bytes(_encoded(pattern(28), "PNG"))
    c.expect(".hidden.png", "hidden")
    c.skipped_by_training.add(".hidden.png")

    # not part of the dataset
    (root / "anim.gif").write_bytes(_encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    c.expect("anim.gif", "unsupported_format")
    (root / "scan.tiff").write_bytes(_encoded(pattern(29), "TIFF"))
    c.expect("scan.tiff", "unsupported_format")
    (root / "folder.png").mkdir()
    c.expect("folder.png", "directory")
    (root / "step_5.preview.png").write_bytes(_encoded(pattern(30), "PNG"))
    c.expect("step_5.preview.png", "preview")
    (root / "orphan.txt").write_text("a caption whose picture was deleted")
    c.expect("orphan.txt", "orphan_caption")
    return c


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (not following links): kind, mode, and SHA-256 of its bytes where readable."""
    import hashlib

    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", st.st_mode)
        else:
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except PermissionError:
                digest = "unreadable"
            out[rel] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out
