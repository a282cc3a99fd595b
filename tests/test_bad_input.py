"""Bad input gets a clear ValueError/TypeError/OSError that names the problem, before the language model runs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

SEQ = 577


@pytest.fixture(scope="module")
def repo(tiny_repo_factory):
    return tiny_repo_factory("llama")


@pytest.fixture(scope="module")
def processor(repo):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(repo, trust_remote_code=True)


@pytest.fixture(scope="module")
def model(repo):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()


def chat(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def image_block(image) -> dict:
    return {"type": "image", "image": image}


def encode(processor, conversation, **kwargs):
    return processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


@pytest.mark.parametrize("markers, images", [(1, 2), (2, 1), (0, 1), (1, 0)])
def test_markers_and_images_must_match(processor, markers, images):
    text = f"{processor.image_token}\n" * markers + "What is it?"
    with pytest.raises(ValueError, match=rf"{markers} {re.escape(processor.image_token)} markers but {images} images"):
        processor(text=text, images=[Image.new("RGB", (8, 8))] * images or None)


def test_pixel_values_without_image_tokens(processor, model):
    inputs = processor(text="no image here", return_tensors="pt")
    with pytest.raises(ValueError, match=r"0 image tokens.*1 images were given"):
        model(**inputs, pixel_values=torch.zeros(1, 3, 768, 768))


@pytest.mark.parametrize("shape", [(1, 3, 512, 512), (1, 4, 768, 768), (1, 768, 768, 3)])
def test_pixel_values_at_the_wrong_resolution_or_channels(processor, model, shape):
    inputs = encode(processor, chat(image_block(Image.new("RGB", (8, 8))), {"type": "text", "text": "hi"}))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(images, 3, 768, 768\), got"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(shape))


def test_missing_image_file_names_the_path(processor, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(OSError, match="nope.png"):
        encode(processor, chat(image_block(str(missing)), {"type": "text", "text": "hi"}))


def test_truncated_image_file_names_the_path(processor, tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(OSError, match="cut.png"):
        processor(text=processor.image_token, images=str(path))


@pytest.mark.parametrize("thing", [object(), 3.5, {"not": "an image"}, b"\x89PNG"])
def test_non_image_objects_are_a_type_error(processor, thing):
    with pytest.raises(TypeError, match="Unsupported image"):
        processor(text=processor.image_token, images=[thing])


def test_truncation_never_cuts_through_an_image(processor):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="577"):
        processor(text=f"a b c {processor.image_token} d e", images=image, truncation=True, max_length=100)
    inputs = processor(
        text=processor.image_token + " word" * 50, images=image, truncation=True, max_length=SEQ + 12, return_tensors="pt"
    )
    assert inputs["input_ids"].shape[-1] == SEQ + 12  # text-only truncation is fine
    assert int((torch.as_tensor(inputs["input_ids"]) == processor.image_token_id).sum()) == SEQ
