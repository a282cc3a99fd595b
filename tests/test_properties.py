"""Property-based tests (hypothesis) of processor + model on the tiny model: whatever images and text people send,
the result is either correct (577 tokens per image, each image's own pixel values, each conversation's own logits in
a padded batch) or a documented error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from florence_vl.configuration_florence_vl import IMAGE_TOKENS

SEQ = 577
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet's (the facts doc)
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"]
# derandomize: the same examples every run, so a failure reproduces (and a pass is not luck of the draw).
SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def images(draw) -> Image.Image:
    """Any PIL mode, 1 to 4096 pixels per side, aspect ratios up to 200:1."""
    short = draw(st.integers(1, 512))
    long = draw(st.integers(short, min(4096, short * 200)))
    width, height = (short, long) if draw(st.booleans()) else (long, short)
    mode = draw(st.sampled_from(MODES))
    colour = draw(st.integers(0, 255))
    base = Image.new("L", (width, height), colour)
    return base if mode == "L" else base.convert(mode)


IMAGE_TOKEN = IMAGE_TOKENS["llama"]
texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


@st.composite
def messages(draw) -> tuple[list[dict], int, bool]:
    """A one-turn chat with 0-3 images and text pieces in random order; (messages, images, has stray markers)."""
    num_images = draw(st.integers(0, 3))
    pieces = [{"type": "image", "image": draw(images())} for _ in range(num_images)]
    stray = False
    for _ in range(draw(st.integers(0, 2))):
        text = draw(texts)
        if draw(st.integers(0, 5)) == 0:
            text += IMAGE_TOKEN  # a user typing the placeholder itself
        stray = stray or IMAGE_TOKEN in text
        pieces.append({"type": "text", "text": text})
    order = draw(st.permutations(range(len(pieces))))
    return [{"role": "user", "content": [pieces[i] for i in order]}], num_images, stray


@pytest.fixture(scope="module")
def processor(tiny_repo_factory):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_repo_factory("llama"), trust_remote_code=True)


@pytest.fixture(scope="module")
def model(tiny_repo_factory):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_repo_factory("llama"), trust_remote_code=True).eval()


def encode(processor, conversations):
    return processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )


@settings(max_examples=40, **SETTINGS)
@given(chat=messages())
def test_processor_gives_577_tokens_per_image_or_names_the_mismatch(processor, chat):
    conversation, num_images, stray = chat
    if stray:
        with pytest.raises(ValueError, match="markers"):
            encode(processor, conversation)
        return
    inputs = encode(processor, conversation)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == SEQ * num_images
    assert inputs["attention_mask"].shape == inputs["input_ids"].shape
    assert "token_type_ids" not in inputs
    if num_images:
        assert inputs["pixel_values"].shape == (num_images, 3, 768, 768)
        # Each image's values are its own, whatever else the message holds, and lie in the normalised 0-255 range.
        alone = [processor(images=piece["image"], return_tensors="pt")["pixel_values"][0]
                 for piece in conversation[0]["content"] if piece["type"] == "image"]
        assert torch.equal(inputs["pixel_values"], torch.stack(alone))
        low, high = [((value - MEAN) / STD).view(3, 1, 1) for value in (0.0, 1.0)]
        assert ((inputs["pixel_values"] >= low - 1e-6) & (inputs["pixel_values"] <= high + 1e-6)).all()
    else:
        assert "pixel_values" not in inputs


@settings(max_examples=6, **SETTINGS)
@given(batch=st.lists(messages(), min_size=1, max_size=3))
def test_batches_run_through_the_model(processor, model, batch):
    batch = [chat for chat in batch if not chat[2]]  # stray markers are the processor test's business
    if not batch:
        return
    inputs = encode(processor, [conversation for conversation, _, _ in batch])
    counts = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert counts == [SEQ * n for _, n, _ in batch]
    with torch.no_grad():
        logits = model(**inputs).logits
        # Each conversation's next-token logits in the left-padded batch are those of the conversation alone.
        alone = [model(**encode(processor, [conversation])).logits[0, -1] for conversation, _, _ in batch]
    assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    torch.testing.assert_close(logits[:, -1], torch.stack(alone), atol=1e-4, rtol=1e-4)
