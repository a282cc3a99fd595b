"""Entry points on a saved tiny repo: AutoProcessor + generate, the image-text-to-text pipeline, streaming, and
loading a folder saved by this transformers version with the other one (FLORENCE_VL_OTHER_PYTHON)."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest
import torch
from PIL import Image

from conftest import require_fixture

FIXTURE = require_fixture()
IMAGE_PATH = FIXTURE / "shapes_640x480.png"
QUESTION = "What is shown in the image?"
MAX_NEW_TOKENS = 6
GREEDY = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}


def chat(image_block: dict) -> list[dict]:
    return [{"role": "user", "content": [image_block, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module", params=["llama", "phi3"])
def loaded(request, tiny_repo_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tiny_repo_factory(request.param)
    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True).eval()
    return folder, processor, model


@pytest.fixture(scope="module")
def pipe(loaded):
    from transformers import pipeline

    folder, _, _ = loaded
    return pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def reference(loaded) -> tuple[list[int], str]:
    """Greedy generate + decode of the new tokens for IMAGE_PATH, the way a user would without the pipeline.

    A fixture of `loaded`, so each model gets its own (a cache keyed by id(model) mixed the two models up when the
    first one's id was reused after it was freed)."""
    _, processor, model = loaded
    inputs = encode(processor, Image.open(IMAGE_PATH))
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert len(new) == MAX_NEW_TOKENS or new[-1].item() in _eos_ids(model)
    return out[0].tolist(), processor.decode(new, skip_special_tokens=True)


def encode(processor, image):
    """Model inputs for the one-image chat, as a user builds them."""
    return encode_chat(processor, chat({"type": "image", "image": image}))


def encode_chat(processor, messages):
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def test_auto_processor_and_generate(loaded, reference):
    _, processor, model = loaded
    assert type(processor).__name__ == "FlorenceVLProcessor"
    assert model.config.image_token_id == processor.image_token_id
    ids, _ = reference
    assert ids.count(processor.image_token_id) == processor.image_seq_length
    # generate is greedy: each new token is the argmax of one forward pass over everything before it.
    inputs = encode(processor, Image.open(IMAGE_PATH))
    prompt_length = inputs["input_ids"].shape[1]
    full = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=full[:, :-1], pixel_values=inputs["pixel_values"]).logits
    assert logits[0, prompt_length - 1:].argmax(-1).tolist() == ids[prompt_length:]


@pytest.mark.parametrize("source", ["pil", "path"])
def test_pipeline_chat_matches_generate(reference, pipe, source):
    full_ids, expected_text = reference
    block = {"type": "image", "image": Image.open(IMAGE_PATH)} if source == "pil" else {"type": "image", "path": str(IMAGE_PATH)}

    new_text = pipe(text=chat(block), return_full_text=False, generate_kwargs=GREEDY)
    assert new_text[0]["generated_text"] == expected_text

    tensors = pipe(text=chat(block), return_tensors=True, generate_kwargs=GREEDY)
    assert torch.as_tensor(tensors[0]["generated_token_ids"]).tolist() == full_ids

    full = pipe(text=chat(block), generate_kwargs=GREEDY)[0]["generated_text"]
    assert full[-1] == {"role": "assistant", "content": expected_text}


def test_pipeline_plain_images_and_text(loaded, reference, pipe):
    _, processor, _ = loaded
    _, expected_text = reference
    prompt = processor.apply_chat_template(chat({"type": "image", "image": None}), add_generation_prompt=True)
    out = pipe(images=Image.open(IMAGE_PATH), text=prompt, return_full_text=False, generate_kwargs=GREEDY)
    assert out[0]["generated_text"] == expected_text
    out = pipe(images=str(IMAGE_PATH), text=prompt, return_full_text=False, generate_kwargs=GREEDY)
    assert out[0]["generated_text"] == expected_text


def test_streaming_equals_decode(loaded, reference):
    from transformers import TextIteratorStreamer

    _, processor, model = loaded
    _, expected_text = reference
    inputs = encode(processor, Image.open(IMAGE_PATH))
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
    thread = threading.Thread(target=model.generate, kwargs={**inputs, **GREEDY, "streamer": streamer})
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == expected_text


def test_batched_generation_is_left_padded(loaded, reference):
    _, processor, model = loaded
    chats = [
        chat({"type": "image", "image": Image.open(IMAGE_PATH)}),
        [{"role": "user", "content": [{"type": "image", "image": Image.open(IMAGE_PATH)}, {"type": "text", "text": "Hi"}]}],
    ]
    inputs = processor.apply_chat_template(
        chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["attention_mask"][:, -1].all()  # left padding: every row ends on a real token
    assert not inputs["attention_mask"][1, 0]
    single = encode_chat(processor, chats[1])
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
        alone = model.generate(**single, **GREEDY)
    _, expected_text = reference
    first, second = processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])
    # Each prompt alone and in a left-padded batch: same greedy answer (float32 on CPU), the padded row included.
    assert first == expected_text
    assert second == processor.post_process_image_text_to_text(alone[:, single["input_ids"].shape[1]:])[0]


# ----------------------------------------------------------------------------------------- the other version
OTHER_PYTHON = os.environ.get("FLORENCE_VL_OTHER_PYTHON")

_OTHER_SCRIPT = r"""
import json, os, sys, tempfile
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="florence_vl_other_")
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, image_path, question, max_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
chat = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path)}, {"type": "text", "text": question}]}]
inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
result = {
    "version": transformers.__version__,
    "processor": type(processor).__name__,
    "input_ids": inputs["input_ids"][0].tolist(),
    "keys": sorted(inputs.keys()),
    "pixel_sum": float(inputs["pixel_values"].double().sum()),
}
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
result["generated"] = out[0].tolist()
print("RESULT" + json.dumps(result))
"""


@pytest.mark.skipif(
    not OTHER_PYTHON,
    reason="set FLORENCE_VL_OTHER_PYTHON to the other transformers version's python (e.g. .venv-tf4/bin/python) "
    "to check that folders saved here load there",
)
def test_folder_saved_here_loads_in_other_version(loaded, reference):
    import transformers

    folder, processor, _ = loaded
    run = subprocess.run(
        [OTHER_PYTHON, "-c", _OTHER_SCRIPT, str(folder), str(IMAGE_PATH), QUESTION, str(MAX_NEW_TOKENS)],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "HF_HOME"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.split("RESULT", 1)[1])
    assert result["version"] != transformers.__version__, "FLORENCE_VL_OTHER_PYTHON runs the same version"
    assert result["processor"] == "FlorenceVLProcessor"
    inputs = encode(processor, Image.open(IMAGE_PATH))
    assert result["keys"] == sorted(inputs.keys())
    assert result["input_ids"] == inputs["input_ids"][0].tolist()
    assert result["pixel_sum"] == pytest.approx(float(inputs["pixel_values"].double().sum()), abs=1e-6)
    ids, _ = reference
    assert result["generated"] == ids
