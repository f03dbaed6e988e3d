"""Tiny captioning models built in code and saved like downloaded ones (shared by the data and UI tests).

``write_tiny_blip``: a BLIP captioner with 16-wide layers and a 15-word tokenizer; ``write_tiny_tagger``: an ONNX
"tagger" whose scores are channel means or constants (see ``TAGGER_TAGS``). The fixtures ``tiny_blip`` and
``tiny_tagger`` in ``conftest.py`` build each once per session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[DEC]",
] + "a red blue circle square on the background of".split()


def write_tiny_blip(folder: Path) -> Path:
    """A BLIP captioning model with 16-wide layers and a 15-word tokenizer, saved like a downloaded one."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = dict(vision, vocab_size=len(VOCAB), max_position_embeddings=32)
    config = BlipConfig(
        vision_config=vision | dict(image_size=32, patch_size=16),
        text_config=text | dict(bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3),
        projection_dim=16,
        image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    vocab.unlink()  # the saved tokenizer files must be enough
    return folder


# (CSV name, category, score): an int score is the mean of that input channel / 255 (0 = B, 1 = G, 2 = R of the
# BGR input); a float is a constant probability.
TAGGER_TAGS = [
    ("general", 9, 0.99),  # rating: never written
    ("long_hair", 0, 0.5),
    ("blue_sky", 0, 0),  # B channel
    ("red_dress", 0, 2),  # R channel
    ("^_^", 0, 0.36),  # kaomoji: underscores stay
    ("smile", 0, 0.2),
    ("hatsune_miku", 4, 0.9),
    ("kagamine_rin", 4, 0.8),  # above the general threshold, below the character one
    ("green_hair", 0, 1),  # G channel
]


def write_tiny_tagger(folder: Path) -> Path:
    """An ONNX "tagger" on 8 x 8 NHWC inputs whose scores are channel means or constants (see TAGGER_TAGS)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    k = len(TAGGER_TAGS)
    weight, bias = np.zeros((3, k), np.float32), np.zeros(k, np.float32)
    for j, (_, _, score) in enumerate(TAGGER_TAGS):
        if isinstance(score, int):
            weight[score, j] = 1.0
        else:
            bias[j] = score
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weight"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", k])],
        initializer=[
            numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c, _) in enumerate(TAGGER_TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder
