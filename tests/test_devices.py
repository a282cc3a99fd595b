"""The same tests on every device this machine has: CPU always, CUDA where there is one (so nothing GPU-only can rot
unseen), each compared with the CPU in float32, where a device bug would show: float32 logits, bfloat16 answers of the
trained embedded model (its answers depend on the image), a left-padded batch mixing a text-only row and a two-image
row, sdpa against eager, and placement with `device_map`.

On the CPU the CUDA comparisons reduce to the CPU against a second CPU load, so the bfloat16 rows carry the CPU's own
check: bfloat16 against float32 within the bounds measured here. On a GPU machine `bash scripts/gpu_check.sh` runs this
file, the docs' GPU blocks and the GPU benchmark in one go."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from conftest import ROOT

from shapes_data import OFF_TASK_ANSWER, Scene, draw_scene

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EMBEDDED = ROOT / "assets" / "tiny-florence-vl"
# Float32 on another device against the CPU's: kernels differ in summation order only (measured on the CPU against
# itself: 0; cuBLAS/cuDNN on the H100 class stay far inside this).
FLOAT32_TOLERANCE = dict(atol=1e-4, rtol=1e-4)
# bfloat16 against float32, on the embedded model's logits over the batch below: measured 0.199 at most (CPU, torch
# 2.13, transformers 4.57.6 and 5.23.0); bounded at 0.5, while two images swapped between rows shift them by 13.8.
BFLOAT16_MAX_LOGIT_ERROR = 0.5
# A colour, a count and a shape question about three drawn scenes, and an off-task question without an image: the
# rows of one left-padded batch. Their right answers are the scenes' (tests/test_embedded_model.py holds the shipped
# weights to them at scale).
SCENES = [Scene("triangle", "green", 1), Scene("circle", "red", 2), Scene("square", "blue", 3)]
ROWS = [("What colour is the shape?", [0]), ("Is it raining?", []), ("How many shapes are there?", [1]),
        ("What shape are they?", [2])]
ANSWERS = [SCENES[images[0]].answer(question) if images else OFF_TASK_ANSWER for question, images in ROWS]


def scene_image(index: int) -> Image.Image:
    """One of SCENES, drawn at a fixed seed."""
    return draw_scene(SCENES[index], random.Random(index), size=(200, 160))


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(EMBEDDED, trust_remote_code=True)


def load(dtype: torch.dtype = torch.float32, device: str | None = "cpu", **kwargs):
    """The embedded model in `dtype`, moved to `device` (None: where `device_map` put it)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(EMBEDDED, trust_remote_code=True, dtype=dtype, **kwargs)
    return (model.to(device) if device else model).eval()


def chat(question: str, images: list[int]) -> list[dict]:
    content = [{"type": "image", "image": scene_image(i)} for i in images] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def batch(processor, rows=ROWS, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """The rows as one left-padded batch (a text-only row among them), on `device`, pixels in `dtype`."""
    inputs = processor.apply_chat_template([chat(q, images) for q, images in rows], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    return {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}


@pytest.fixture(scope="module")
def cpu_logits(processor) -> torch.Tensor:
    with torch.no_grad():
        return load()(**batch(processor)).logits


def answers(model, processor, inputs: dict) -> list[str]:
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    return [text.strip() for text in
            processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def test_the_batch_mixes_text_only_padded_and_several_image_rows(processor):
    """What the other tests rely on: a text-only row, a row of two images' worth of tokens, left padding."""
    two_images = [("How many shapes are there?", [1, 2])]
    inputs = batch(processor, ROWS + two_images)
    counts = (inputs["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert counts == [processor.image_seq_length * len(images) for _, images in ROWS + two_images]
    assert (inputs["attention_mask"][:, 0] == 0).any() and (inputs["attention_mask"][:, -1] == 1).all()


def test_float32_logits_equal_the_cpus(processor, device, cpu_logits):
    with torch.no_grad():
        logits = load(device=device)(**batch(processor, device=device)).logits
    torch.testing.assert_close(logits.cpu(), cpu_logits, **FLOAT32_TOLERANCE)


def test_each_row_of_the_padded_batch_equals_the_row_alone(processor, device, cpu_logits):
    model = load(device=device)
    mask = batch(processor)["attention_mask"]
    for row, (question, images) in enumerate(ROWS):
        with torch.no_grad():
            alone = model(**batch(processor, [(question, images)], device=device)).logits[0].cpu()
        kept = cpu_logits[row][mask[row].bool()]
        torch.testing.assert_close(alone, kept, **FLOAT32_TOLERANCE)


def test_bfloat16_answers_equal_the_known_answers(processor, device):
    model = load(torch.bfloat16, device)
    assert answers(model, processor, batch(processor, device=device, dtype=torch.bfloat16)) == ANSWERS
    # float32 pixels too: the model casts them to its tower's dtype itself (transformers 4.57 does not).
    assert answers(model, processor, batch(processor, device=device)) == ANSWERS


def test_bfloat16_logits_stay_within_the_measured_bound(processor, device, cpu_logits):
    with torch.no_grad():
        logits = load(torch.bfloat16, device)(**batch(processor, device=device, dtype=torch.bfloat16)).logits
    mask = batch(processor)["attention_mask"].bool()
    error = (logits.float().cpu() - cpu_logits)[mask].abs().max().item()
    print(f"bfloat16 on {device}: max logit error {error:.3f} against CPU float32")
    assert error <= BFLOAT16_MAX_LOGIT_ERROR


def test_float16_answers_equal_the_known_answers(processor, device):
    model = load(torch.float16, device)
    assert answers(model, processor, batch(processor, device=device, dtype=torch.float16)) == ANSWERS


def test_sdpa_and_eager_agree_on_the_padded_batch(processor, device):
    inputs = batch(processor, device=device)
    mask = inputs["attention_mask"].bool().cpu()
    with torch.no_grad():
        sdpa = load(device=device, attn_implementation="sdpa")(**inputs).logits.cpu()
        eager = load(device=device, attn_implementation="eager")(**inputs).logits.cpu()
    torch.testing.assert_close(sdpa[mask], eager[mask], **FLOAT32_TOLERANCE)


def test_device_map_places_every_weight_on_the_device_and_answers(processor, device):
    model = load(torch.bfloat16, None, device_map=device)
    assert {p.device.type for p in model.parameters()} == {device}
    assert answers(model, processor, batch(processor, device=device, dtype=torch.bfloat16)) == ANSWERS


def test_device_map_auto_takes_the_best_device_here():
    model = load(torch.bfloat16, None, device_map="auto")
    assert {p.device.type for p in model.parameters()} == {DEVICES[-1]}
