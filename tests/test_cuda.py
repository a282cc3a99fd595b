"""CUDA: bfloat16/float16 generation, sdpa vs eager, device_map="auto". Skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEQ = 577


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = FlorenceVLForConditionalGeneration(tiny_config("llama")).eval()
    folder = tmp_path_factory.mktemp("tiny_cuda")
    model.save_pretrained(folder)
    return folder


def inputs(device: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(9, 400, (12,), generator=generator)
    ids = torch.cat([text[:4], torch.full((SEQ,), 400), text[4:]])[None]
    pixels = torch.randn(1, 3, 768, 768, generator=generator)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, dtype),
    }


def load(folder, **kwargs) -> FlorenceVLForConditionalGeneration:
    return FlorenceVLForConditionalGeneration.from_pretrained(folder, **kwargs).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generate_on_cuda(saved, dtype):
    reference = load(saved, dtype=torch.float32).to("cuda")
    model = load(saved, dtype=dtype).to("cuda")
    with torch.no_grad():
        expected = reference(**inputs("cuda")).logits[0, -1].float()
        logits = model(**inputs("cuda", dtype)).logits[0, -1].float()
    assert torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits, expected, dim=0) > 0.99
    # float32 pixel values are cast by the model itself (transformers 4.57 does not cast them).
    tokens = model.generate(**inputs("cuda"), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert tokens.shape[1] == inputs("cuda")["input_ids"].shape[1] + 8


def test_sdpa_and_eager_agree_on_cuda(saved):
    sdpa = load(saved, dtype=torch.float32, attn_implementation="sdpa").to("cuda")
    eager = load(saved, dtype=torch.float32, attn_implementation="eager").to("cuda")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**inputs("cuda")).logits, eager(**inputs("cuda")).logits, atol=2e-4, rtol=1e-4)


def test_device_map_auto_places_the_model_on_the_gpu(saved):
    model = load(saved, dtype=torch.bfloat16, device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    tokens = model.generate(**inputs("cuda", torch.bfloat16), max_new_tokens=4, do_sample=False)
    assert tokens.device.type == "cuda"
