from __future__ import annotations

import hashlib

import torch
from safetensors.torch import save_file

from sdtune.formats.hashes import a1111_legacy_hash, a1111_short_hash, addnet_hash, sha256_file


def test_short_and_legacy_hash_follow_their_definitions(tmp_path):
    data = bytes(range(256)) * 8192  # 2 MiB, so the legacy window at 1 MiB is inside the file
    path = tmp_path / "m.ckpt"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert a1111_short_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    assert a1111_legacy_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_addnet_hash_ignores_metadata(tmp_path):
    tensors = {"a": torch.arange(10.0)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"ss_output_name": "x"})
    save_file(tensors, tmp_path / "y.safetensors", metadata={"ss_output_name": "a much longer name"})
    assert addnet_hash(tmp_path / "x.safetensors") == addnet_hash(tmp_path / "y.safetensors")
    assert sha256_file(tmp_path / "x.safetensors") != sha256_file(tmp_path / "y.safetensors")
