"""The UI touches only files inside its roots: `../`, absolute paths elsewhere and symlinks out are refused."""

from __future__ import annotations

import os

import pytest

from sdtune.config import METHOD_SCHEMAS, parse_config
from sdtune.ui import datasets
from sdtune.ui.paths import PathRefused, Roots, confine_config
from sdtune.world import write_concept_dataset


@pytest.fixture
def layout(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    return root, outside


def refused(roots: Roots, path, what="path") -> str:
    with pytest.raises(PathRefused) as caught:
        roots.resolve(path, what=what)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{what}: ")
    assert "outside the folders this UI may use" in message or "cannot be resolved" in message
    return message


def test_paths_inside_resolve_to_real_absolute_paths(layout):
    root, _ = layout
    roots = Roots([root])
    assert roots.resolve("data") == (root / "data").resolve()
    assert roots.resolve(str(root / "data" / "new.txt")) == (root / "data" / "new.txt").resolve()
    assert roots.resolve("data/../data/x.png") == (root / "data" / "x.png").resolve()
    assert roots.resolve(".") == root.resolve()


@pytest.mark.parametrize("escape", ["..", "../outside/secret.txt", "data/../../outside", "data/../../../../etc/passwd"])
def test_dot_dot_escapes_are_refused(layout, escape):
    root, _ = layout
    refused(Roots([root]), escape, what="dataset")


def test_absolute_paths_outside_are_refused(layout):
    root, outside = layout
    roots = Roots([root])
    message = refused(roots, outside / "secret.txt", what="data.path")
    assert str(root.resolve()) in message  # says which folders are allowed
    refused(roots, "/etc/passwd")
    refused(roots, str(root) + "-sibling/x")  # a prefix of the root's name is not the root


def test_symlinks_that_point_out_are_refused(layout):
    root, outside = layout
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "data" / "file-out.txt").symlink_to(outside / "secret.txt")
    (root / "link-in").symlink_to(root / "data", target_is_directory=True)
    roots = Roots([root])
    assert "is a link that points outside" in refused(roots, "link-out/secret.txt")
    refused(roots, "data/file-out.txt")
    assert roots.resolve("link-in") == (root / "data").resolve()  # a link that stays inside is fine


def test_a_symlink_loop_is_refused_with_a_message(layout):
    root, _ = layout
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    with pytest.raises(PathRefused):
        Roots([root]).resolve("a/x", what="path")


def test_several_roots_and_must_exist(layout):
    root, outside = layout
    roots = Roots([root, outside])
    assert roots.resolve(outside / "secret.txt") == (outside / "secret.txt").resolve()
    with pytest.raises(PathRefused, match="does not exist"):
        roots.resolve("missing", must_exist=True)
    with pytest.raises(PathRefused, match="no such folder"):
        Roots([root / "nope"])


def test_config_paths_are_confined_and_made_absolute(layout):
    root, outside = layout
    roots = Roots([root])
    data = {"method": "textual_inversion", "name": "n", "token": "<t>", "data": {"path": "data"}}
    cfg = confine_config(parse_config(data, METHOD_SCHEMAS["textual_inversion"]), roots)
    assert cfg.data.path == str((root / "data").resolve())
    assert cfg.output_dir == str((root / "runs").resolve())
    assert cfg.model.base == "builtin"  # not a path
    with_template = data | {"data": {"path": "data", "template": "subject_filewords"}}
    assert confine_config(parse_config(with_template, METHOD_SCHEMAS["textual_inversion"]), roots).data.template == (
        "subject_filewords"
    )
    for field, bad in (
        ("data.path", data | {"data": {"path": str(outside)}}),
        ("output_dir", data | {"output_dir": "../outside"}),
        ("model.base", data | {"model": {"base": str(outside / "model.safetensors")}}),
        ("init_embedding", data | {"init_embedding": "/etc/passwd"}),
        ("data.template", data | {"data": {"path": "data", "template": str(outside / "t.txt")}}),
    ):
        with pytest.raises(PathRefused) as caught:
            confine_config(parse_config(bad, METHOD_SCHEMAS["textual_inversion"]), roots)
        assert str(caught.value).startswith(f"{field}: ")


def test_dataset_functions_refuse_escapes_and_skip_images_linked_from_outside(layout):
    root, outside = layout
    write_concept_dataset("teal_heart", root / "data", n=2)
    write_concept_dataset("teal_heart", outside / "imgs", n=1)
    os.symlink(outside / "imgs" / "0000.png", root / "data" / "zz-linked.png")
    roots = Roots([root])
    items = datasets.open_dataset(roots, "data")
    assert [i.image.name for i in items] == ["0000.png", "0001.png"]  # the link out is not listed
    with pytest.raises(PathRefused):
        datasets.open_dataset(roots, "../outside/imgs")
    with pytest.raises(PathRefused):
        datasets.save_caption(roots, outside / "imgs" / "0000.png", "overwritten")
    with pytest.raises(PathRefused):
        datasets.save_caption(roots, "data/zz-linked.png", "overwritten")  # resolves to the outside file
    assert (outside / "imgs" / "0000.txt").read_text() != "overwritten"
    with pytest.raises(PathRefused):
        datasets.bulk_tags(roots, str(outside / "imgs"), add="x")
    with pytest.raises(PathRefused):
        datasets.check(roots, "..", count_tokens=False)
