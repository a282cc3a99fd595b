"""Acceptance: the fixture's original checkpoint, converted by convert_checkpoint.py and loaded through the Auto
classes (float64, remote code, offline), reproduces every number the ORIGINAL code recorded in the fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import require_fixture
from PIL import Image
from safetensors.torch import load_file, save_file

import convert_checkpoint
from florence_vl.compatibility_florence_vl import IS_TRANSFORMERS_4
from florence_vl.configuration_florence_vl import REMOTE_CODE_FILES

# 5.x has no AutoModelForVision2Seq; 4.57 users still reach for it.
AUTO_CLASS = transformers.AutoModelForVision2Seq if IS_TRANSFORMERS_4 else transformers.AutoModelForImageTextToText
FEATURE_TOL, LOGIT_TOL = 1e-8, 1e-5
IMAGE_INDEX = -200  # the original's image placeholder in input_ids_with_image_index


def strip_tower(original: Path, folder: Path) -> Path:
    """A copy of the original checkpoint whose shards carry no tower: the converter must use vision_tower/."""
    shutil.copytree(original, folder)
    (folder / "model.safetensors").chmod(0o644)
    weights = load_file(str(original / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.startswith(convert_checkpoint.TOWER_PREFIX)}
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=["tower_in_shards", "tower_folder"])
def converted(request, tmp_path_factory) -> Path:
    """The fixture checkpoint converted; `tower_folder` first removes the tower from the shards."""
    original = require_fixture() / "original_checkpoint"
    root = tmp_path_factory.mktemp(request.param)
    src = strip_tower(original, root / "src") if request.param == "tower_folder" else original
    out = root / "converted"
    convert_checkpoint.convert(str(src), str(out))
    return out


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(require_fixture() / "expected.safetensors"))


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return json.loads((require_fixture() / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def model(converted):
    return AUTO_CLASS.from_pretrained(converted, trust_remote_code=True, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def processor(converted):
    return transformers.AutoProcessor.from_pretrained(converted, trust_remote_code=True)


def expand_image_index(ids: torch.Tensor, image_token_id: int, length: int) -> torch.Tensor:
    """The fixture's ids with the original -200 placeholder replaced by `length` image tokens."""
    position = int((ids[0] == IMAGE_INDEX).nonzero())
    image = torch.full((length,), image_token_id, dtype=ids.dtype)
    return torch.cat([ids[0, :position], image, ids[0, position + 1 :]])[None]


def chat_inputs(processor, case: dict) -> dict[str, torch.Tensor]:
    """Model inputs built as a user would: the PNG and the question through the processor's chat template."""
    image = Image.open(require_fixture() / case["image"])
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": case["question"]}]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def max_diff(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item()


def test_converted_repo_layout(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", *REMOTE_CODE_FILES} <= names
    assert not any(p.name.endswith(".partial") for p in converted.parent.iterdir())
    card = (converted / "README.md").read_text()
    assert card.startswith("---\npipeline_tag: image-text-to-text\nlibrary_name: transformers\n")
    assert "assets/example.png" in card and (converted / "assets" / "example.png").is_file()  # its snippets run


@pytest.mark.parametrize("index", [0, 1, 2])
def test_processor_reproduces_the_original_inputs(processor, model, expected, cases, index):
    inputs = chat_inputs(processor, cases[index])
    reference_ids = expand_image_index(
        expected[f"case{index}.input_ids_with_image_index"], model.config.image_token_id, model.config.image_seq_length
    )
    assert inputs["input_ids"].tolist() == reference_ids.tolist()
    assert max_diff(inputs["pixel_values"], expected[f"case{index}.pixel_values"]) <= 1e-6


@pytest.mark.parametrize("index", [0, 1, 2])
def test_features_logits_and_greedy_tokens_match_the_original(processor, model, expected, cases, index):
    inputs = chat_inputs(processor, cases[index])
    pixel_values = inputs["pixel_values"].to(torch.float64)
    with torch.no_grad():
        depth = model.model.get_depth_features(pixel_values).pooler_output
        breadth = model.model.get_breadth_features(depth)
        projected = model.get_image_features(pixel_values).pooler_output
        logits = model(**inputs).logits
        generated = model.generate(**inputs, do_sample=False, min_new_tokens=12, max_new_tokens=12)
    diffs = {
        "depth": max_diff(depth, expected[f"case{index}.florence_image_features"]),
        "breadth": max_diff(torch.cat(list(breadth.values()), dim=-1), expected[f"case{index}.florence_prompt_features"]),
        "projected": max_diff(projected, expected[f"case{index}.projected_image_features"]),
        "logits": max_diff(logits, expected[f"case{index}.logits"]),
    }
    print(f"case{index} max differences: {diffs}")
    assert diffs["depth"] <= FEATURE_TOL and diffs["breadth"] <= FEATURE_TOL and diffs["projected"] <= FEATURE_TOL, diffs
    assert diffs["logits"] <= LOGIT_TOL, diffs
    prompt_length = inputs["input_ids"].shape[1]
    assert generated[0, prompt_length:].tolist() == cases[index]["generated_ids"]


def test_fixture_ids_path_matches_too(model, expected, cases):
    """Same numbers from the fixture's own pixel_values and ids (independent of the processor)."""
    ids = expand_image_index(expected["case0.input_ids_with_image_index"], model.config.image_token_id, 577)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=expected["case0.pixel_values"].double()).logits
    assert max_diff(logits, expected["case0.logits"]) <= LOGIT_TOL
