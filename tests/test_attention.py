"""`sdpa` and `eager` attention give the same outputs in every part of the model that attends: the DaViT tower (depth
features), the Florence-2 BART encoder (breadth features) and the LLM, each compared on its own output, float32 on the
embedded model; each part is checked to run the implementation asked for."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import ROOT

MODEL = ROOT / "assets" / "tiny-florence-vl"
TOLERANCE = 1e-5  # float32, relative to the output's scale; measured: about 1e-6 in each part


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: AutoModelForImageTextToText.from_pretrained(MODEL, trust_remote_code=True, dtype=torch.float32,
                                                              attn_implementation=name).eval()
            for name in ("eager", "sdpa")}


@pytest.fixture(scope="module")
def inputs() -> dict:
    from PIL import Image

    processor = AutoProcessor.from_pretrained(MODEL, trust_remote_code=True)
    chats = [[{"role": "user", "content": [{"type": "image", "image": Image.open(ROOT / "assets" / "example.png")},
                                          {"type": "text", "text": question}]}]
             for question in ("What colour is the shape?", "How many shapes are there in this picture?")]
    return processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding=True)  # left padding: a masked LLM batch


def test_every_part_runs_the_implementation_asked_for(models):
    for name, model in models.items():
        config = model.config
        assert {config.vision_config._attn_implementation, config.breadth_encoder_config._attn_implementation,
                config.text_config._attn_implementation} == {name}


@torch.no_grad()
def test_sdpa_and_eager_agree_in_every_part(models, inputs):
    """Each part on the same input for both implementations (the breadth encoder on eager's depth features, the LLM on
    the text-only left-padded batch), so that a difference belongs to that part alone."""
    depth = models["eager"].model.get_depth_features(inputs["pixel_values"]).pooler_output
    text = inputs["input_ids"].masked_fill(inputs["input_ids"] == models["eager"].config.image_token_id, 9)
    outputs = {}
    for name, model in models.items():
        outputs[name] = {
            "DaViT (depth features)": model.model.get_depth_features(inputs["pixel_values"]).pooler_output,
            "BART encoder (breadth features)": torch.stack(list(model.model.get_breadth_features(depth).values())),
            "LLM (logits of a left-padded batch)": model(input_ids=text, attention_mask=inputs["attention_mask"])
            .logits[inputs["attention_mask"].bool()],
        }
    for part, eager in outputs["eager"].items():
        difference = float((outputs["sdpa"][part] - eager).abs().max())
        assert difference <= TOLERANCE * max(1.0, float(eager.abs().max())), (part, difference)
