"""TRL's SFTTrainer on the embedded model, called as TRL's documentation calls it for vision-language models:
conversational `messages` + `images` rows (multi-turn, a text-only row mixed in) and `assistant_only_loss=True`.
The loss falls, only the answers and their end-of-turn tokens are trained, and the saved folder reloads and answers.
Tested with TRL 1.16.0 under transformers 4.57.6 and 5.23.0 (requirements-test.txt)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from conftest import ROOT

trl = pytest.importorskip("trl", reason="TRL 1.16 needs huggingface_hub >= 1, which transformers 4.57 refuses; the test "
                         "command installs it with transformers 5.x (requirements-trl.txt)")

from shapes_data import COLOUR_QUESTION, SHAPE_QUESTION, Scene, draw_scene  # noqa: E402

SCENES = [Scene("circle", "red", 1), Scene("square", "blue", 1), Scene("triangle", "yellow", 1),
          Scene("circle", "green", 1)]


def dataset():
    """Two-turn samples about drawn shapes (colour, then shape), and one text-only sample."""
    from datasets import Dataset

    rng = random.Random(0)
    rows = [{"images": [draw_scene(scene, rng)],
             "messages": [{"role": "user", "content": COLOUR_QUESTION},
                          {"role": "assistant", "content": scene.answer(COLOUR_QUESTION)},
                          {"role": "user", "content": SHAPE_QUESTION},
                          {"role": "assistant", "content": scene.answer(SHAPE_QUESTION)}]}
            for scene in SCENES]
    rows.append({"images": [], "messages": [{"role": "user", "content": "Which colours do you know?"},
                                            {"role": "assistant", "content": "red blue green yellow"}]})
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few SFTTrainer steps on the embedded model; returns (trainer, the folder it saved)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ask import materialise_embedded_model

    folder = materialise_embedded_model(tmp_path_factory.mktemp("trl") / "tiny-florence-vl-trl")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    out = tmp_path_factory.mktemp("trl_out") / "tiny-florence-vl-sft"
    args = trl.SFTConfig(output_dir=str(out), assistant_only_loss=True, max_steps=8, per_device_train_batch_size=5,
                         learning_rate=3e-4, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                         report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, max_length=None)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=processor)
    trainer.train()
    trainer.save_model(str(out))
    return trainer, out


def test_only_answers_and_their_end_of_turn_are_trained(trained):
    trainer, _ = trained
    processor = trainer.processing_class
    rows = [dataset()[0], dataset()[4]]  # a two-turn sample with an image, and the text-only one
    batch = trainer.data_collator(rows)
    for row, ids, labels in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist()):
        assert all(label in (-100, token) for token, label in zip(ids, labels))
        trained_tokens = [token for token, label in zip(ids, labels) if label != -100]
        answers = [m["content"] + "<|eot_id|>" for m in row["messages"] if m["role"] == "assistant"]
        assert processor.tokenizer.decode(trained_tokens) == "".join(answers)
        assert ids[:2] == [0, 0]  # the release's two BOS: TRL tokenizes without special tokens, the template has them


def test_loss_falls(trained):
    trainer, _ = trained
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_saved_folder_reloads_and_answers(trained):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, out = trained
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.open(ROOT / "assets" / "example.png")},
                                         {"type": "text", "text": COLOUR_QUESTION}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == "green"  # assets/example.png is a green triangle
