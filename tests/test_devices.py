"""The same tests on every device this machine has: CPU always, CUDA where there is one (so nothing GPU-only can rot
unseen). Half-precision forward and generate, sdpa against eager, device placement with `device_map`.

On a GPU machine, `bash scripts/gpu_check.sh` runs this file, the docs' GPU blocks and the GPU benchmark in one go."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_IMAGE_TOKEN_IDS, tiny_config

from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMAGE_TOKENS = 577


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = FlorenceVLForConditionalGeneration(tiny_config("llama")).eval()
    folder = tmp_path_factory.mktemp("tiny_devices")
    model.save_pretrained(folder)
    return folder


def inputs(device: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A prompt of 12 text tokens around one image's placeholders (the tiny config's image token), and its pixels."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(9, 400, (12,), generator=generator)
    ids = torch.cat([text[:4], torch.full((IMAGE_TOKENS,), TINY_IMAGE_TOKEN_IDS["llama"]), text[4:]])[None]
    pixels = torch.randn(1, 3, 768, 768, generator=generator)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, dtype),
    }


def load(folder, **kwargs) -> FlorenceVLForConditionalGeneration:
    return FlorenceVLForConditionalGeneration.from_pretrained(folder, **kwargs).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_and_generate(saved, device, dtype):
    reference = load(saved, dtype=torch.float32).to(device)
    model = load(saved, dtype=dtype).to(device)
    with torch.no_grad():
        expected = reference(**inputs(device)).logits[0, -1].float()
        logits = model(**inputs(device, dtype)).logits[0, -1].float()
    assert torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits, expected, dim=0) > 0.99
    # float32 pixel values are cast by the model itself (transformers 4.57 does not cast them).
    tokens = model.generate(**inputs(device), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert tokens.shape[1] == inputs(device)["input_ids"].shape[1] + 8 and tokens.device.type == device


def test_sdpa_and_eager_agree(saved, device):
    sdpa = load(saved, dtype=torch.float32, attn_implementation="sdpa").to(device)
    eager = load(saved, dtype=torch.float32, attn_implementation="eager").to(device)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**inputs(device)).logits, eager(**inputs(device)).logits, atol=2e-4, rtol=1e-4)


def test_device_map_places_every_weight_on_the_device(saved, device):
    model = load(saved, dtype=torch.bfloat16, device_map=device)
    assert {p.device.type for p in model.parameters()} == {device}
    tokens = model.generate(**inputs(device, torch.bfloat16), max_new_tokens=4, do_sample=False)
    assert tokens.device.type == device


def test_device_map_auto_takes_the_best_device_here(saved):
    model = load(saved, dtype=torch.bfloat16, device_map="auto")
    assert {p.device.type for p in model.parameters()} == {DEVICES[-1]}
