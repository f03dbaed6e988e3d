"""Textual inversion on tiny SD1 and SDXL models: what trains, what is written, who can read it."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from sdtune.adapters.token_embedding import expand_token
from sdtune.config import TextualInversionConfig
from sdtune.core.errors import ConfigError, DataError, SdtuneError
from sdtune.core.events import EventBus
from sdtune.formats.embeddings import Embedding, load_embedding, save_safetensors
from sdtune.inference.generate import make_pipeline
from sdtune.methods.textual_inversion import setup
from sdtune.models.loading import load_model
from sdtune.models.text_encoding import encode_prompts
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir


def ti_config(tmp_path, model, folder, **extra):
    base = {
        "method": "textual_inversion",
        "name": "ti",
        "output_dir": str(tmp_path / "runs"),
        "token": "<new-thing>",
        "num_vectors": 3,
        "init_text": "red square",
        "model": {"base": str(model)},
        "data": {"path": str(folder), "template": "subject_filewords", "batch_size": 2},
        "optimizer": {"lr": 0.05},
        "train": {"max_steps": 6},
        "save": {"every_n_steps": 3},
        "preview": {"steps": 2, "before_training": False},
    }
    for key, value in extra.items():
        base[key] = base[key] | value if isinstance(value, dict) else value
    return TextualInversionConfig.model_validate(base)


def run_job(cfg):
    job = setup(cfg, Accelerator(cpu=True))
    outputs = train(job, cfg, RunDir(tmp := cfg.output_dir + "/" + cfg.name), EventBus(), Accelerator(cpu=True))
    del tmp
    return job, outputs


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_only_new_vectors_train_and_every_other_row_is_unchanged(tmp_path, tiny_checkpoint, image_folder, family):
    path = tiny_checkpoint(family)
    original = load_model(path)
    cfg = ti_config(tmp_path, path, image_folder)
    start = [t.extra.detach().clone() for t in setup(cfg, Accelerator(cpu=True)).tables]
    job, outputs = run_job(cfg)
    for before, table in zip(original.text_encoders, job.tables, strict=True):
        assert torch.equal(table.base.weight, before.get_input_embeddings().weight)  # untouched rows
        assert table.extra.shape[0] == 3
    for table, before in zip(job.tables, start, strict=True):
        assert not torch.equal(table.extra.detach().cpu(), before)  # the new rows did train
    for name, module in job.model.modules().items():
        for key, value in module.state_dict().items():
            if "token_embedding" not in key:
                assert torch.equal(value, original.modules()[name].state_dict()[key]), (name, key)
    suffixes = sorted(p.suffix for p in outputs)
    assert suffixes == ([".safetensors"] if family == "sdxl" else [".png", ".pt", ".safetensors"])


def test_a1111_init_spreads_the_init_tokens(tmp_path, tiny_checkpoint, image_folder):
    cfg = ti_config(tmp_path, tiny_checkpoint("sd1"), image_folder)
    job = setup(cfg, Accelerator(cpu=True))
    table = job.tables[0].base.weight
    red, square = job.model.tokenizers[0]("red square", add_special_tokens=False).input_ids
    vectors = job.tables[0].extra.detach()
    # 2 init tokens over 3 vectors: token i*2//3 -> red, red, square
    assert torch.equal(vectors[0], table[red]) and torch.equal(vectors[1], table[red])
    assert torch.equal(vectors[2], table[square])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_load_textual_inversion_gives_the_same_prompt_embeddings(
    tmp_path, tiny_checkpoint, image_folder, family
):
    """The written file, read by diffusers, conditions the model exactly as sdtune's in-training encoder did."""

    path = tiny_checkpoint(family)
    job, outputs = run_job(ti_config(tmp_path, path, image_folder))
    prompt = "a photo of <new-thing> on a table"  # diffusers writes the multi-vector token out itself
    with torch.no_grad():
        ours = encode_prompts(job.model, [expand_token(prompt, "<new-thing>", 3)])
    fresh = load_model(path)
    file = next(p for p in outputs if p.suffix == ".safetensors")
    pipe = make_pipeline(fresh)  # diffusers' own SD / SDXL pipeline over the fresh base modules
    if family == "sdxl":
        state = load_embedding(file).vectors
        pipe.load_textual_inversion(
            state["clip_l"], token="<new-thing>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token="<new-thing>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        with torch.no_grad():
            context, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        torch.testing.assert_close(pooled, ours.pooled)
    else:
        pipe.load_textual_inversion(str(file), token="<new-thing>")
        with torch.no_grad():
            context, _ = pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)
    torch.testing.assert_close(context, ours.context)


def test_every_written_format_reads_back_to_the_trained_vectors(tmp_path, tiny_checkpoint, image_folder):
    job, outputs = run_job(ti_config(tmp_path, tiny_checkpoint("sd1"), image_folder))
    trained = job.tables[0].extra.detach().cpu()
    for path in outputs:
        emb = load_embedding(path)
        torch.testing.assert_close(emb.vectors["text_encoder"], trained, msg=str(path))
        assert emb.step == 6 and emb.name == "new-thing"


def test_resume_from_embedding_file_continues_its_step_count(tmp_path, tiny_checkpoint, image_folder):
    start = tmp_path / "start.safetensors"
    save_safetensors(Embedding("new-thing", {"text_encoder": torch.randn(3, 16)}, step=4), start)
    cfg = ti_config(tmp_path, tiny_checkpoint("sd1"), image_folder, init_embedding=str(start), train={"max_steps": 6})
    job, outputs = run_job(cfg)
    rows = RunDir(tmp_path / "runs" / "ti").metrics()
    assert [r["step"] for r in rows] == [5, 6]
    assert load_embedding(outputs[0]).step == 6


# --- bad input: one-line errors naming the thing and the fix ---------------------------------------------


def _error(cfg) -> str:
    with pytest.raises(SdtuneError) as exc:
        setup(cfg, Accelerator(cpu=True))
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_missing_and_empty_dataset_folders(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint("sd1")
    assert "no such dataset folder" in _error(ti_config(tmp_path, model, tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "no images found" in _error(ti_config(tmp_path, model, tmp_path / "empty"))


def test_undecodable_images_are_reported_and_skipped(tmp_path, tiny_checkpoint, image_folder, capsys):
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (image_folder / "notes.jpg").write_text("not an image")
    job = setup(ti_config(tmp_path, tiny_checkpoint("sd1"), image_folder), Accelerator(cpu=True))
    assert job.num_examples() == 4
    out = "".join(capsys.readouterr().out.split())  # the console wraps long temporary paths at any character
    assert "broken.png" in out and "notes.jpg" in out


def test_template_without_name(tmp_path, tiny_checkpoint, image_folder):
    template = tmp_path / "t.txt"
    template.write_text("a photo of [filewords]\n")
    message = _error(ti_config(tmp_path, tiny_checkpoint("sd1"), image_folder, data={"template": str(template)}))
    assert "[name]" in message and str(template) in message


def test_token_already_in_vocabulary(tmp_path, tiny_checkpoint, image_folder):
    cfg = ti_config(tmp_path, tiny_checkpoint("sd1"), image_folder, token="cat", num_vectors=1)
    with pytest.raises(ConfigError, match=r"token: 'cat' is already in the tokenizer's vocabulary \(id 2368\)"):
        setup(cfg, Accelerator(cpu=True))


def test_embedding_of_another_width(tmp_path, tiny_checkpoint, image_folder):
    other = tmp_path / "sd2-style.safetensors"
    save_safetensors(Embedding("x", {"text_encoder": torch.randn(3, 1024)}), other)
    cfg = ti_config(tmp_path, tiny_checkpoint("sd1"), image_folder, init_embedding=str(other))
    message = _error(cfg)
    assert "1024" in message and str(other) in message


def test_bad_input_errors_are_the_right_kind(tmp_path, tiny_checkpoint):
    with pytest.raises(DataError):
        setup(ti_config(tmp_path, tiny_checkpoint("sd1"), tmp_path / "missing"), Accelerator(cpu=True))
