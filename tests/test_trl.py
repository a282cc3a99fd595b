"""TRL's SFTTrainer on the embedded model, exactly as docs/fine-tuning.md shows it (that block runs here as written):
conversational `messages` + `images` rows (several turns, a text-only row mixed in) and `assistant_only_loss=True`.
The loss falls, only the answers and their end-of-turn tokens are trained, and the saved folder reloads and answers.
Tested with TRL 1.16.0 under transformers 5.23.0 (requirements-trl.txt)."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import ROOT, card_python_blocks, require

trl = require("trl", "TRL 1.16 needs huggingface_hub >= 1, which transformers 4.57 refuses; the test command "
              "installs it with transformers 5.x (requirements-trl.txt)")

TRL_MARKER = "<!-- card-test: trl -->"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> dict:
    """The namespace of docs/fine-tuning.md's TRL block, run in a scratch folder that sees the repo's assets/."""
    import os

    (block,) = [code for marker, code in card_python_blocks((ROOT / "docs" / "fine-tuning.md").read_text())
                if marker == TRL_MARKER]
    scratch = tmp_path_factory.mktemp("trl_recipe")
    (scratch / "assets").symlink_to(ROOT / "assets")
    here = os.getcwd()
    os.chdir(scratch)  # the block's relative paths: assets/ in, florence-vl-sft/ out
    try:
        namespace = {"__name__": "__docs__"}
        exec(compile(block, "docs/fine-tuning.md TRL block", "exec"), namespace)
    finally:
        os.chdir(here)
    namespace["saved"] = scratch / "florence-vl-sft"
    return namespace


def test_only_answers_and_their_end_of_turn_are_trained(recipe):
    trainer, dataset = recipe["trainer"], recipe["dataset"]
    rows = [dataset[0], dataset[1]]  # two turns about an image, and a text-only row
    batch = trainer.data_collator(rows)
    for row, ids, labels in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist()):
        assert all(label in (-100, token) for token, label in zip(ids, labels))
        trained = [token for token, label in zip(ids, labels) if label != -100]
        answers = [m["content"] + "<|eot_id|>" for m in row["messages"] if m["role"] == "assistant"]
        assert recipe["processor"].tokenizer.decode(trained) == "".join(answers)
        assert ids[:2] == [0, 0]  # the release's two BOS: TRL tokenizes without special tokens, the template has them


def test_loss_falls(recipe):
    losses = [entry["loss"] for entry in recipe["trainer"].state.log_history if "loss" in entry]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_saved_folder_reloads_and_answers(recipe):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    saved = recipe["saved"]
    model = AutoModelForImageTextToText.from_pretrained(saved, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.open(ROOT / "assets" / "example.png")},
                                         {"type": "text", "text": "What colour is the shape?"}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == "green"  # assets/example.png is a green triangle
