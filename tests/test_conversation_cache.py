"""Conversations continued from their cache, as transformers documents it for multi-turn generation: keep
`past_key_values` from `generate(..., return_dict_in_generate=True)`, render the whole chat again with
`processor.apply_chat_template`, call `generate(**inputs, past_key_values=cache)`. The images whose placeholders the
cache holds are not encoded again; the greedy tokens equal a full recompute of the same ids (no cache); a cache that
ends inside an image's placeholders is a clear error. On the embedded model, under both transformers versions."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import ROOT

MODEL = ROOT / "assets" / "tiny-florence-vl"
NEW = 8


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(MODEL, trust_remote_code=True)


@pytest.fixture(scope="module")
def model():
    return AutoModelForImageTextToText.from_pretrained(MODEL, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def images():
    return [Image.open(ROOT / "assets" / "example.png").convert("RGB"), Image.new("RGB", (320, 200), (30, 160, 60))]


def user(question: str, image=None) -> dict:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
    return {"role": "user", "content": content}


def render(processor, conversations: list[list[dict]]):
    """The whole chats as the processor renders them, left-padded into one batch."""
    return processor.apply_chat_template(conversations if len(conversations) > 1 else conversations[0],
                                         add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding=True)


def greedy(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, max_new_tokens=NEW, return_dict_in_generate=True, **kwargs)


def new_tokens(output, inputs) -> list[list[int]]:
    return output.sequences[:, inputs["input_ids"].shape[1]:].tolist()


def answer(processor, tokens: list[int]) -> str:
    return processor.decode(tokens, skip_special_tokens=True)


def count_image_encodings(model) -> list[int]:
    """How many images each forward of the model encodes (a hook on its image seam)."""
    seen = []
    original = model.model.get_image_features

    def counting(pixel_values, **kwargs):
        seen.append(pixel_values.shape[0])
        return original(pixel_values, **kwargs)

    model.model.get_image_features = counting
    return seen


@pytest.fixture
def encodings(model):
    seen = count_image_encodings(model)
    yield seen
    del model.model.get_image_features  # back to the class's method


def continue_and_recompute(model, inputs, cache) -> tuple[list, list]:
    """Greedy tokens continued from `cache` and recomputed from scratch, for the same rendered ids."""
    continued = greedy(model, inputs, past_key_values=cache)
    recomputed = greedy(model, inputs)
    return new_tokens(continued, inputs), new_tokens(recomputed, inputs)


def test_text_only_follow_ups_reuse_the_image(model, processor, images, encodings):
    chat = [user("How many shapes are there?", images[0])]
    inputs = render(processor, [chat])
    first = greedy(model, inputs)
    assert encodings == [1]
    cache, sequence = first.past_key_values, first.sequences
    for question in ("What colour are they?", "What shape are they?"):
        chat += [{"role": "assistant", "content": [{"type": "text", "text": answer(processor, new_tokens(first, inputs)[0])}]},
                 user(question)]
        inputs = render(processor, [chat])
        # The cache holds the earlier ids as the new render starts (the pattern's premise, checked).
        assert inputs["input_ids"][0, :cache.get_seq_length()].tolist() == sequence[0, :cache.get_seq_length()].tolist()
        encodings.clear()
        continued = greedy(model, inputs, past_key_values=copy.deepcopy(cache))
        assert encodings == []  # the image is not encoded again
        recomputed = greedy(model, inputs)
        assert new_tokens(continued, inputs) == new_tokens(recomputed, inputs)
        first, cache, sequence = continued, continued.past_key_values, continued.sequences


def test_a_second_image_in_a_later_turn_is_encoded_alone(model, processor, images, encodings):
    chat = [user("What colour is the shape?", images[0])]
    inputs = render(processor, [chat])
    first = greedy(model, inputs)
    chat += [{"role": "assistant", "content": [{"type": "text", "text": answer(processor, new_tokens(first, inputs)[0])}]},
             user("And this one?", images[1])]
    inputs = render(processor, [chat])
    assert inputs["pixel_values"].shape[0] == 2
    encodings.clear()
    continued, recomputed = continue_and_recompute(model, inputs, first.past_key_values)
    assert encodings[0] == 1  # the new image only; the recompute then encodes both
    assert encodings[1] == 2
    assert continued == recomputed


def test_a_cache_that_ends_inside_the_previous_answer(model, processor, images):
    chat = [user("How many shapes are there?", images[0])]
    inputs = render(processor, [chat])
    first = greedy(model, inputs, min_new_tokens=3)
    cache = first.past_key_values
    keep = inputs["input_ids"].shape[1] + 1  # the prompt and the answer's first token
    cache.crop(keep - cache.get_seq_length())  # a negative count: what both versions' crop accept
    chat += [{"role": "assistant", "content": [{"type": "text", "text": answer(processor, new_tokens(first, inputs)[0])}]},
             user("What colour are they?")]
    continued, recomputed = continue_and_recompute(model, render(processor, [chat]), cache)
    assert continued == recomputed


def test_the_callers_own_pixel_values_may_be_left_out(model, processor, images):
    chat = [user("How many shapes are there?", images[0])]
    inputs = render(processor, [chat])
    first = greedy(model, inputs)
    chat += [{"role": "assistant", "content": [{"type": "text", "text": answer(processor, new_tokens(first, inputs)[0])}]},
             user("What colour are they?")]
    inputs = render(processor, [chat])
    recomputed = new_tokens(greedy(model, inputs), inputs)
    without_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
    assert new_tokens(greedy(model, without_pixels, past_key_values=first.past_key_values), inputs) == recomputed


def test_a_batch_of_two_conversations_with_left_padding(model, processor, images):
    """Two chats of different lengths in one left-padded batch, continued together: each row is its first turn (as
    generated) then its follow-up turn, the shorter follow-up padded where it starts (mask 0); the second row's
    follow-up brings a new image. Each row's cached image is skipped, the new one encoded; the tokens equal the
    recompute of the same rows."""
    chats = [[user("How many shapes are there?", images[0])], [user("What colour is it?", images[1])]]
    inputs = render(processor, chats)
    assert (inputs["attention_mask"] == 0).any()  # left padding
    first = greedy(model, inputs, min_new_tokens=NEW)  # no row ends early: no padding after an answer
    tokenizer, seq = processor.tokenizer, model.config.image_seq_length

    def text(value: str) -> list[int]:
        return tokenizer(value, add_special_tokens=False)["input_ids"]

    # The follow-up turn as the Llama-3 template writes it (the answer's <|eot_id|> first).
    tails = [text("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat colour are they?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n"),
             text("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n") + [model.config.image_token_id] * seq
             + text("\nAnd this one?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")]
    width = max(map(len, tails))
    rows, masks = [], []
    for row, tail in enumerate(tails):
        pad = width - len(tail)
        rows.append(torch.cat([first.sequences[row], torch.full((pad,), tokenizer.pad_token_id), torch.tensor(tail)]))
        masks.append(torch.cat([inputs["attention_mask"][row], torch.ones(NEW, dtype=torch.long),
                                torch.zeros(pad, dtype=torch.long), torch.ones(len(tail), dtype=torch.long)]))
    new_image = processor.image_processor(images[0], return_tensors="pt")["pixel_values"]
    continuation = {"input_ids": torch.stack(rows), "attention_mask": torch.stack(masks),
                    "pixel_values": torch.cat([inputs["pixel_values"], new_image])}
    seen = count_image_encodings(model)
    try:
        continued, recomputed = continue_and_recompute(model, continuation, first.past_key_values)
    finally:
        del model.model.get_image_features
    assert seen == [1, 3]  # the continuation: the new image only; the recompute: all three
    assert continued == recomputed


def test_a_cache_ending_inside_an_image_is_a_clear_error(model, processor, images):
    inputs = render(processor, [[user("How many shapes are there?", images[0])]])
    ids = inputs["input_ids"][0].tolist()
    inside = ids.index(model.config.image_token_id) + 5
    with torch.no_grad():
        cache = model(input_ids=inputs["input_ids"][:, :inside], pixel_values=None, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="cache ends inside an image's placeholders"):
        greedy(model, inputs, past_key_values=cache)


# ------------------------------------------------------------------------------------------------- the tools use it
QUESTIONS = ["How many shapes are there?", "What colour are they?", "What shape are they?"]


def recomputed_answers(model, processor, image, questions: list[str]) -> list[str]:
    """Each answer of the conversation computed from the whole chat, without a cache (transformers directly)."""
    chat, answers = [], []
    for number, question in enumerate(questions):
        chat.append(user(question, image if number == 0 else None))
        inputs = render(processor, [chat])
        tokens = new_tokens(model.generate(**inputs, do_sample=False, max_new_tokens=256,
                                           return_dict_in_generate=True), inputs)[0]
        answers.append(answer(processor, tokens))
        chat.append({"role": "assistant", "content": [{"type": "text", "text": answers[-1]}]})
    return answers


@pytest.fixture(scope="module")
def expected(model, processor, images):
    return recomputed_answers(model, processor, images[0], QUESTIONS)


def test_ask_answers_several_questions_as_one_conversation(expected):
    import subprocess
    import sys

    command = [sys.executable, str(ROOT / "ask.py"), "--image", str(ROOT / "assets" / "example.png")]
    for question in QUESTIONS:
        command += ["--question", question]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "".join(f"Q: {q}\nA: {a}\n" for q, a in zip(QUESTIONS, expected))
    assert expected[0] == "one"  # the example image: one green triangle (later turns: see docs/embedded-model.md)


def test_ask_at_a_terminal_asks_for_questions(expected):
    """Without --question and with a terminal on stdin, ask.py prompts until an empty line."""
    import os
    import pty
    import subprocess
    import sys

    primary, secondary = pty.openpty()
    process = subprocess.Popen([sys.executable, str(ROOT / "ask.py")], stdin=secondary, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    os.close(secondary)
    os.write(primary, ("\n".join(QUESTIONS[:2]) + "\n\n").encode())
    out, err = process.communicate(timeout=300)
    os.close(primary)
    assert process.returncode == 0, err[-3000:]
    assert out.splitlines() == [f"A: {a}" for a in expected[:2]]


def test_the_demo_keeps_each_sessions_cache_within_its_bound(images, expected):
    """app.Chat: a session's follow-up continues from its cache (the image not encoded again), the answers are the
    recomputed ones; `forget` (clear, a new image) drops it; beyond `max_sessions` the least recent is dropped and
    its next answer is recomputed, the same."""
    import app

    chat = app.Chat(str(MODEL), "cpu", 256, max_sessions=1)
    encodings = count_image_encodings(chat.model)

    def turn(messages, session, question, image=None):
        messages.append(user(question, image))
        text = list(chat.stream(messages, session))[-1]
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        return text

    first, second = [], []
    assert turn(first, "a", QUESTIONS[0], images[0]) == expected[0]
    encodings.clear()
    assert turn(first, "a", QUESTIONS[1]) == expected[1]
    assert encodings == []  # continued from session a's cache
    turn(second, "b", QUESTIONS[0], images[1])  # a second session: a's cache is evicted (max_sessions 1)
    assert list(chat.caches) == ["b"]
    encodings.clear()
    assert turn(first, "a", QUESTIONS[2]) == expected[2]
    assert encodings == [1]  # recomputed, with the same answer
    chat.forget("b")
    assert list(chat.caches) == ["a"]
