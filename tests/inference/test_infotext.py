from __future__ import annotations

from PIL import Image

from sdtune.inference.infotext import format_infotext, parse_infotext, quote, save_png


def test_quote_follows_a1111():
    assert quote("DDIM") == "DDIM"
    assert quote("a, b") == '"a, b"'
    assert quote("x: y") == '"x: y"'


def test_format_and_parse_round_trip():
    params = {
        "Steps": 20,
        "Sampler": "Euler a",
        "CFG scale": 7.0,
        "Seed": 42,
        "Size": "64x64",
        "Model hash": "0123456789",
        "Model": "my, model",
        "Version": "sdtune 0.1.0",
        "Skipped": None,
    }
    text = format_infotext("a red circle on a blue background", "blurry, dark", params)
    assert text.splitlines()[1] == "Negative prompt: blurry, dark"
    assert "Skipped" not in text
    prompt, negative, parsed = parse_infotext(text)
    assert prompt == "a red circle on a blue background"
    assert negative == "blurry, dark"
    assert parsed["Model"] == "my, model"  # quoted because of the comma, unquoted on reading
    assert parsed["Sampler"] == "Euler a" and parsed["Seed"] == "42" and parsed["Size"] == "64x64"


def test_png_carries_parameters_chunk(tmp_path):
    text = format_infotext("p", "", {"Steps": 5, "Sampler": "DDIM", "Seed": 1})
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "x.png", text)
    with Image.open(path) as img:
        assert img.text["parameters"] == text
