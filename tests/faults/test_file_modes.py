"""Files tessera writes get the usual umask-based mode, weights like JSON (storage's docstring)."""

import os
import stat

import torch

from tessera.storage import atomic_write_json, save_tensors


def test_weights_and_json_get_the_same_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "model.safetensors", {"w": torch.zeros(3)})
        atomic_write_json(tmp_path / "config.json", {"a": 1})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}
