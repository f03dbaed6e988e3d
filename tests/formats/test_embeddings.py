"""Textual-inversion embedding files: every writer round-trips, diffusers reads what we write, bad files fail
with one-line errors naming the file."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.core.errors import DataError, ModelError, SdtuneError
from sdtune.formats.embeddings import (
    Embedding,
    check_width,
    load_embedding,
    save_a1111_pt,
    save_diffusers,
    save_safetensors,
)
from sdtune.formats.png_embedding import save_png_embedding


def make(widths: tuple[int, ...], n: int, seed: int = 0) -> Embedding:
    gen = torch.Generator().manual_seed(seed)
    keys = ("text_encoder",) if len(widths) == 1 else ("clip_l", "clip_g")
    vectors = {k: torch.randn(n, w, generator=gen) for k, w in zip(keys, widths, strict=True)}
    return Embedding("teal-heart", vectors, step=1234, sd_checkpoint="0123456789", sd_checkpoint_name="tiny-sd1")


def _save_png(emb: Embedding, path: Path) -> None:
    save_png_embedding(emb, Image.new("RGB", (24, 24), (40, 90, 200)), path)


WRITERS = {
    "a1111.pt": save_a1111_pt,
    "kohya.safetensors": save_safetensors,
    "learned_embeds.safetensors": save_diffusers,
    "preview.png": _save_png,
}


def assert_same(got: Embedding, want: Embedding) -> None:
    assert got.name == want.name
    assert got.step == want.step
    assert (got.sd_checkpoint, got.sd_checkpoint_name) == (want.sd_checkpoint, want.sd_checkpoint_name)
    assert set(got.vectors) == set(want.vectors)
    for key, vec in want.vectors.items():
        assert got.vectors[key].dtype == torch.float32
        assert torch.equal(got.vectors[key], vec), key


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("width", [16, 768])
@pytest.mark.parametrize("filename", list(WRITERS))
def test_single_encoder_roundtrip(tmp_path, filename, width, n):
    emb = make((width,), n)
    path = tmp_path / filename
    WRITERS[filename](emb, path)
    got = load_embedding(path)
    assert got.num_vectors == n and not got.is_sdxl and got.widths == (width,)
    assert_same(got, emb)


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("widths", [(8, 16), (768, 1280)])
def test_sdxl_roundtrip(tmp_path, widths, n):
    emb = make(widths, n)
    save_safetensors(emb, tmp_path / "xl.safetensors")
    with safe_open(str(tmp_path / "xl.safetensors"), "pt") as fh:
        assert set(fh.keys()) == {"clip_l", "clip_g"}
    got = load_embedding(tmp_path / "xl.safetensors")
    assert got.is_sdxl and got.widths == widths and got.num_vectors == n
    assert_same(got, emb)


@pytest.mark.parametrize("writer", [save_a1111_pt, save_diffusers, _save_png])
def test_sdxl_refused_by_single_encoder_formats(tmp_path, writer):
    path = tmp_path / "xl.out"
    with pytest.raises(DataError) as err:
        writer(make((8, 16), 2), path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "safetensors" in msg
    assert not path.exists()


def test_a1111_pt_layout(tmp_path):
    emb = make((16,), 3)
    save_a1111_pt(emb, tmp_path / "e.pt")
    data = torch.load(tmp_path / "e.pt", weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]) == ["*"]
    vec = data["string_to_param"]["*"]
    assert vec.dtype == torch.float32 and vec.is_contiguous() and torch.equal(vec, emb.vectors["text_encoder"])
    assert (data["name"], data["step"], data["sd_checkpoint"]) == ("teal-heart", 1234, "0123456789")


def test_safetensors_layout_and_metadata(tmp_path):
    emb = make((16,), 2)
    emb.sd_checkpoint_name = None
    save_safetensors(emb, tmp_path / "k.safetensors", dtype=torch.float16)
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as fh:
        assert list(fh.keys()) == ["emb_params"]
        assert fh.get_tensor("emb_params").dtype == torch.float16
        assert fh.metadata() == {"format": "pt", "name": "teal-heart", "step": "1234", "sd_checkpoint": "0123456789"}
    got = load_embedding(tmp_path / "k.safetensors")
    assert got.vectors["text_encoder"].dtype == torch.float32
    assert torch.equal(got.vectors["text_encoder"], emb.vectors["text_encoder"].half().float())
    assert got.sd_checkpoint_name is None


def test_names(tmp_path):
    vec = torch.randn(2, 16)
    save_file({"emb_params": vec}, str(tmp_path / "stem-name.safetensors"))  # kohya file without our metadata
    assert load_embedding(tmp_path / "stem-name.safetensors").name == "stem-name"
    assert load_embedding(tmp_path / "stem-name.safetensors", name="given").name == "given"
    torch.save({"<cat-toy>": torch.randn(16)}, tmp_path / "learned_embeds.bin")  # old diffusers: 1-D, no step
    got = load_embedding(tmp_path / "learned_embeds.bin")
    assert (got.name, got.step, tuple(got.vectors["text_encoder"].shape)) == ("<cat-toy>", 0, (1, 16))
    save_a1111_pt(make((16,), 1), tmp_path / "other-stem.pt")
    assert load_embedding(tmp_path / "other-stem.pt").name == "teal-heart"  # the file's name field wins
    save_diffusers(make((16,), 1), tmp_path / "d.safetensors", token="<tok>")
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as fh:
        assert list(fh.keys()) == ["<tok>"]


def test_rinongal_parameterdict(tmp_path):
    vec = torch.randn(2, 16)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "embeddings.pt")
    got = load_embedding(tmp_path / "embeddings.pt")
    assert got.name == "embeddings" and torch.equal(got.vectors["text_encoder"], vec)
    assert not got.vectors["text_encoder"].requires_grad


# diffusers' load_textual_inversion is an independent reader of our files.


def _pipeline(family: str):
    import diffusers

    from sdtune.models.tiny import build_tiny

    m = build_tiny(family)
    tokenizers = [copy.deepcopy(t) for t in m.tokenizers]  # loading adds tokens: keep shipped ones untouched
    scheduler = diffusers.DDIMScheduler.from_config(m.scheduler_config)
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=m.vae,
            text_encoder=m.text_encoders[0],
            text_encoder_2=m.text_encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=m.unet,
            scheduler=scheduler,
        )
    return diffusers.StableDiffusionPipeline(
        vae=m.vae,
        text_encoder=m.text_encoders[0],
        tokenizer=tokenizers[0],
        unet=m.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _rows(tokenizer, text_encoder, token: str, n: int) -> torch.Tensor:
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    ids = tokenizer.convert_tokens_to_ids(names)
    assert tokenizer.unk_token_id not in ids
    return text_encoder.get_input_embeddings().weight[ids].detach()


@pytest.mark.parametrize("filename", ["a1111.pt", "kohya.safetensors", "learned_embeds.safetensors"])
def test_diffusers_reads_single_encoder(tmp_path, filename):
    pipe = _pipeline("sd1")
    emb = make((pipe.text_encoder.config.hidden_size,), 3, seed=7)
    assert emb.widths == (16,)
    WRITERS[filename](emb, tmp_path / filename)
    pipe.load_textual_inversion(str(tmp_path / filename), token="<x>")
    torch.testing.assert_close(_rows(pipe.tokenizer, pipe.text_encoder, "<x>", 3), emb.vectors["text_encoder"])


def test_diffusers_reads_sdxl(tmp_path):
    from safetensors.torch import load_file

    pipe = _pipeline("sdxl")
    widths = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    emb = make(widths, 2, seed=3)
    save_safetensors(emb, tmp_path / "xl.safetensors")
    state_dict = load_file(tmp_path / "xl.safetensors")
    pipe.load_textual_inversion(
        state_dict["clip_l"], token="<x>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state_dict["clip_g"], token="<x>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    torch.testing.assert_close(_rows(pipe.tokenizer, pipe.text_encoder, "<x>", 2), emb.vectors["clip_l"])
    torch.testing.assert_close(_rows(pipe.tokenizer_2, pipe.text_encoder_2, "<x>", 2), emb.vectors["clip_g"])


# Bad input: one-line errors that name the file.


def one_line_error(exc_type: type[SdtuneError], path: Path, *needles: str, **kwargs) -> str:
    with pytest.raises(exc_type) as err:
        load_embedding(path, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_text_file_named_pt(tmp_path):
    (tmp_path / "notes.pt").write_text("hello, I am not a tensor\n")
    one_line_error(DataError, tmp_path / "notes.pt", "not a PyTorch embedding file")


class _Payload:
    """Unpickling this would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_code_payload_refused(tmp_path, container):
    live = tmp_path / "live-marker"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload really runs code when unpickled unsafely
    assert live.exists()

    marker = tmp_path / "marker"
    data = {"string_to_param": {"*": _Payload(marker)}, "name": "evil"}
    path = tmp_path / "evil.pt"
    if container == "torch.save":
        torch.save(data, path)
    else:
        path.write_bytes(pickle.dumps(data, protocol=2))
    one_line_error(DataError, path, "refused")
    assert not marker.exists()


def test_two_unrelated_tensors(tmp_path):
    save_file({"a": torch.zeros(2, 16), "b": torch.zeros(3)}, str(tmp_path / "two.safetensors"))
    msg = one_line_error(DataError, tmp_path / "two.safetensors", "neither a textual-inversion embedding")
    assert "string_to_param, emb_params, clip_l/clip_g or one tensor" in msg


def test_multiple_terms(tmp_path):
    data = {"string_to_token": {"*": 265, "#": 1}, "string_to_param": {"*": torch.zeros(1, 8), "#": torch.zeros(1, 8)}}
    torch.save(data, tmp_path / "multi.pt")
    one_line_error(DataError, tmp_path / "multi.pt", "embedding file has multiple terms")


@pytest.mark.parametrize(
    "bad",
    ["missing.pt", "renamed.safetensors", "weird.txt", "plain.png", "truncated.bin", "shape.safetensors"],
)
def test_other_bad_files(tmp_path, bad):
    path = tmp_path / bad
    if bad == "renamed.safetensors":
        path.write_text("{}" * 10)
    elif bad == "weird.txt":
        save_file({"emb_params": torch.zeros(1, 4)}, str(path))
    elif bad == "plain.png":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    elif bad == "truncated.bin":
        save_a1111_pt(make((16,), 2), path)
        path.write_bytes(path.read_bytes()[:200])
    elif bad == "shape.safetensors":
        save_file({"emb_params": torch.zeros(2, 3, 4)}, str(path))
    one_line_error(DataError, path)


@pytest.mark.parametrize(
    ("widths", "model", "hint"),
    [
        ((1024,), (768,), "(SD 2.x?)"),
        ((768, 1280), (768,), "(SDXL?)"),
        ((768,), (768, 1280), "(SD 1.x?)"),
        ((16,), (8,), ""),
    ],
)
def test_check_width(widths, model, hint):
    emb = make(widths, 1)
    with pytest.raises(ModelError) as err:
        check_width(emb, model, "x.pt")
    msg = str(err.value)
    assert msg.startswith("x.pt: embedding width") and "\n" not in msg
    assert f"({'+'.join(map(str, model))})" in msg and msg.endswith(f"another model family{' ' + hint if hint else ''}")
    check_width(emb, widths, "x.pt")  # a matching model passes


def test_check_width_message_exact():
    with pytest.raises(
        ModelError,
        match=r"^x\.pt: embedding width 1024 does not match this model's text encoder \(768\); "
        r"it was made for another model family \(SD 2\.x\?\)$",
    ):
        check_width(make((1024,), 1), (768,), "x.pt")


def test_embedding_validates_vectors():
    with pytest.raises(DataError, match="text_encoder"):
        Embedding("x", {"clip_l": torch.zeros(1, 4)})
    with pytest.raises(DataError, match="different vector counts"):
        Embedding("x", {"clip_l": torch.zeros(1, 4), "clip_g": torch.zeros(2, 8)})
    with pytest.raises(DataError, match=r"\[n_vectors, width\]"):
        Embedding("x", {"text_encoder": torch.zeros(4)})
