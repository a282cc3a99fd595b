"""convert_checkpoint.py on broken input: a one-line message naming the problem, a non-zero exit, no traceback,
and nothing at OUT (not even a half-written staging folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, require_fixture
from safetensors.torch import load_file, save_file

import convert_checkpoint as cc


def copy_release(tmp_path: Path) -> Path:
    """A writable copy of the fixture's original checkpoint."""
    src = tmp_path / "src"
    shutil.copytree(require_fixture() / "original_checkpoint", src)
    for path in src.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return src


def rewrite_weights(src: Path, edit) -> None:
    """Rewrite model.safetensors through `edit(dict) -> dict`."""
    weights = edit(load_file(str(src / "model.safetensors")))
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})


def missing_folder(tmp_path: Path) -> Path:
    return tmp_path / "does_not_exist"


def missing_shard(tmp_path: Path) -> Path:
    src = copy_release(tmp_path)
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    weight_map = {"lm_head.weight": "model-00001-of-00002.safetensors", "model.norm.weight": "model-00002-of-00002.safetensors"}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src


def truncated_shard(tmp_path: Path) -> Path:
    src = copy_release(tmp_path)
    path = src / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    return src


def missing_projector(tmp_path: Path) -> Path:
    src = copy_release(tmp_path)
    rewrite_weights(src, lambda w: {k: v for k, v in w.items() if "mm_projector" not in k})
    return src


def missing_tower(tmp_path: Path) -> Path:
    src = copy_release(tmp_path)
    rewrite_weights(src, lambda w: {k: v for k, v in w.items() if not k.startswith(cc.TOWER_PREFIX)})
    shutil.rmtree(src / "vision_tower")
    return src


def partial_tower(tmp_path: Path) -> Path:
    src = copy_release(tmp_path)
    rewrite_weights(src, lambda w: {k: v for k, v in w.items() if ".vision_tower.vision_tower.vision_tower." not in k})
    return src


def wrong_shape(tmp_path: Path) -> Path:
    src = copy_release(tmp_path)
    key = "model.mm_projector.encoder_mlp.0.weight"
    rewrite_weights(src, lambda w: {**w, key: w[key][:, :100].contiguous()})
    return src


def unknown_model_type(tmp_path: Path) -> Path:
    src = copy_release(tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llava_mistral"}))
    return src


def unknown_tensor(tmp_path: Path) -> Path:
    src = copy_release(tmp_path)
    rewrite_weights(src, lambda w: {**w, "model.vision_resampler.weight": w["model.norm.weight"].clone()})
    return src


CASES = {
    missing_folder: "not found",
    missing_shard: "model-00002-of-00002.safetensors",
    truncated_shard: "truncated",
    missing_projector: "missing DBFusion projector (mm_projector) weights",
    missing_tower: "missing vision tower weights",
    partial_tower: "missing vision tower (DaViT) weights",
    wrong_shape: "model.mm_projector.encoder_mlp.0.weight [64, 100]",
    unknown_model_type: "unsupported model_type 'llava_mistral'",
    unknown_tensor: "model.vision_resampler.weight",
}


@pytest.mark.parametrize("make_source", list(CASES), ids=lambda f: f.__name__)
def test_bad_input_fails_cleanly(tmp_path, make_source):
    src = make_source(tmp_path)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), str(src), str(out_parent / "out")],
                            capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert result.returncode == 1, result.stderr  # the documented status of a failed conversion
    assert "Traceback" not in result.stderr + result.stdout
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1, result.stderr
    assert CASES[make_source] in message[0], message[0]
    assert list(out_parent.iterdir()) == []  # nothing at OUT, no staging folder left behind


def test_existing_output_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(cc.ConversionError, match="already exists"):
        cc.convert(str(require_fixture() / "original_checkpoint"), str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise cc.ConversionError("simulated failure after the weights were written")

    monkeypatch.setattr(cc, "write_config", broken)
    with pytest.raises(cc.ConversionError, match="simulated"):
        cc.convert(str(require_fixture() / "original_checkpoint"), str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_validation_error_lists_every_problem():
    """A ValueError (ConversionError) naming unmapped, misshapen and missing tensors at once."""
    expected = {"model.language_model.norm.weight": (4,), "lm_head.weight": (8, 4)}
    sources = [
        cc.SourceTensor("model.norm.weight", (5,), cc.torch.float32),
        cc.SourceTensor("model.something_new", (1,), cc.torch.float32),
    ]
    with pytest.raises(ValueError) as error:
        cc.build_plan(sources, expected)
    message = str(error.value)
    assert "model.something_new" in message and "model.norm.weight [5]" in message and "lm_head" in message


def test_tied_duplicate_fills_the_target_when_the_primary_is_absent():
    name = cc.TOWER_PREFIX + "language_model.model.encoder.embed_tokens.weight"
    plan = cc.build_plan([cc.SourceTensor(name, (10, 4), cc.torch.float32)],
                         {"model.breadth_encoder.embed_tokens.weight": (10, 4)})
    assert [p.target for p in plan.mapped] == ["model.breadth_encoder.embed_tokens.weight"]
