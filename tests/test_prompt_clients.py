"""One prompt for every client: each way a client tokenizes a chat, called as that client's documentation calls it,
gives the release's exact ids (the fixture's, two BOS included) on the fixture's Llama-3 tokenizer and on the
embedded model; `return_assistant_tokens_mask` marks exactly the answers and their end-of-turn tokens.

vLLM's `LLM.chat` and OpenAI server are checked the same way in tests/test_vllm.py (vLLM virtualenv), TRL's trainer
in tests/test_trl.py.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import require, require_fixture, tiny_processor
from PIL import Image
from safetensors.torch import load_file

from florence_vl.compatibility_florence_vl import IS_TRANSFORMERS_4

FIXTURE = require_fixture()
CASES = json.loads((FIXTURE / "cases.json").read_text())["cases"]
EXPECTED = load_file(str(FIXTURE / "expected.safetensors"))
BOS = 0  # <|begin_of_text|> in the fixture's and the embedded model's tokenizers


def fixture_image(index: int) -> Image.Image:
    image = Image.open(FIXTURE / CASES[index]["image"])
    image.load()
    return image


def release_ids(index: int, image_tokens: int, image_token_id: int) -> list[int]:
    """The fixture's prompt ids (what the original code built), the image's -200 marker as `image_tokens` ids."""
    ids = EXPECTED[f"case{index}.input_ids_with_image_index"][0].tolist()
    at = ids.index(-200)
    return ids[:at] + [image_token_id] * image_tokens + ids[at + 1:]


def user_turn(question: str, image=None) -> list[dict]:
    block = {"type": "image", "image": image} if image is not None else {"type": "image"}
    return [{"role": "user", "content": [block, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor("llama")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded model as the complete folder users load."""
    from ask import materialise_embedded_model

    return materialise_embedded_model(tmp_path_factory.mktemp("clients") / "tiny-florence-vl-clients")


def ids_of(output) -> list[int]:
    ids = output["input_ids"]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return ids[0] if ids and isinstance(ids[0], list) else ids


# Each client's way of turning (chat, image) into ids, as its documentation shows it.
def processor_apply_chat_template(processor, chat, image):
    """transformers' processor API and the image-text-to-text pipeline's path."""
    return ids_of(processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True))


def render_then_processor(processor, chat, image):
    """The two-step flow of most model cards (render, then call the processor)."""
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    return ids_of(processor(images=image, text=prompt))


def render_then_processor_without_special_tokens(processor, chat, image):
    """The same, with add_special_tokens=False, as TRL's collators and vLLM's chat path tokenize."""
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    return ids_of(processor(images=image, text=prompt, add_special_tokens=False))


def lmms_eval_huggingface(processor, chat, image):
    """lmms-eval 0.7.3's chat `huggingface` adapter: a rendered batch plus empty videos and audios lists."""
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    return ids_of(processor(text=[prompt], images=[image], videos=[], audios=[], padding=True, return_tensors="pt"))


def trl_vision_collator(processor, chat, image):
    """TRL 1.16's DataCollatorForVisionLanguageModeling on a conversational sample (its SFTTrainer's collator)."""
    require("trl", "TRL 1.16 needs huggingface_hub >= 1, which transformers 4.57 refuses; the test command installs "
            "it with transformers 5.x (requirements-trl.txt)")
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    question = chat[0]["content"][1]["text"]
    collator = DataCollatorForVisionLanguageModeling(processor)
    batch = collator([{"messages": [{"role": "user", "content": question}], "images": [image]}])
    ids = batch["input_ids"][0].tolist()
    # A training sample has no generation prompt: the release's ids end with it (its family's, by its image token).
    generation_prompt = {"<|placeholder1|>": "<|assistant|>\n"}.get(
        processor.image_token, "<|start_header_id|>assistant<|end_header_id|>\n\n")
    return ids + processor.tokenizer(generation_prompt, add_special_tokens=False)["input_ids"]


CLIENTS = [processor_apply_chat_template, render_then_processor, render_then_processor_without_special_tokens,
           lmms_eval_huggingface, trl_vision_collator]


@pytest.mark.parametrize("client", CLIENTS, ids=lambda client: client.__name__)
@pytest.mark.parametrize("index", range(3))
def test_every_client_gets_the_release_ids(processor, client, index):
    image = fixture_image(index)
    ids = client(processor, user_turn(CASES[index]["question"], image), image)
    assert ids == release_ids(index, processor.image_seq_length, processor.image_token_id)
    assert ids[:3] == [BOS, BOS, processor.tokenizer.convert_tokens_to_ids("<|start_header_id|>")]


@pytest.mark.parametrize("index", range(3))
def test_plain_tokenizer_apply_chat_template_gets_the_release_ids(processor, index):
    """A client that uses the tokenizer alone (no image expansion): one placeholder where the release has -200."""
    ids = processor.tokenizer.apply_chat_template(user_turn(CASES[index]["question"]), chat_template=processor.chat_template,
                                                  add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids_of(ids) == release_ids(index, 1, processor.image_token_id)


@pytest.mark.parametrize("client", CLIENTS[1:], ids=lambda client: client.__name__)
def test_embedded_model_every_client_agrees(embedded, client):
    """The shipped folder, loaded as users load it: each client's ids equal the processor's, two BOS first."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(embedded, trust_remote_code=True)
    image = Image.open(FIXTURE / CASES[0]["image"])
    chat = user_turn("What colour is the shape?", image)
    reference = processor_apply_chat_template(processor, chat, image)
    assert reference[:2] == [BOS, BOS] and reference[2] != BOS
    assert client(processor, chat, image) == reference


def test_embedded_tokenizer_alone_agrees(embedded):
    """The folder's own tokenizer (AutoTokenizer, with the chat template it reads from the folder) gives the same ids
    with one placeholder unexpanded, and adds no special tokens of its own."""
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(embedded, trust_remote_code=True)
    image = Image.open(FIXTURE / CASES[0]["image"])
    reference = processor_apply_chat_template(processor, user_turn("What colour is the shape?", image), image)
    tokenizer = AutoTokenizer.from_pretrained(embedded)
    text_ids = ids_of(tokenizer.apply_chat_template(user_turn("What colour is the shape?"), add_generation_prompt=True,
                                                    tokenize=True, return_dict=True))
    at = reference.index(processor.image_token_id)
    assert text_ids == reference[:at + 1] + reference[at + processor.image_seq_length:]  # one placeholder, unexpanded
    assert tokenizer("What colour?")["input_ids"] == tokenizer("What colour?", add_special_tokens=False)["input_ids"]


def test_pipeline_prompts_with_the_release_ids(embedded):
    """The image-text-to-text pipeline on chat messages hands `generate` the same ids as the processor builds."""
    from transformers import AutoProcessor, pipeline

    pipe = pipeline("image-text-to-text", model=str(embedded), trust_remote_code=True)
    seen = []
    generate = pipe.model.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return generate(*args, **kwargs)

    pipe.model.generate = recording_generate
    image = Image.open(FIXTURE / CASES[0]["image"])
    pipe(text=user_turn("What colour is the shape?", image), max_new_tokens=2)
    processor = AutoProcessor.from_pretrained(embedded, trust_remote_code=True)
    assert seen == [processor_apply_chat_template(processor, user_turn("What colour is the shape?", image), image)]


def test_shipped_and_converter_templates_are_the_same_files():
    """The embedded folder carries the converter's Llama-3 template: one prompt format, one file."""
    from conftest import ROOT

    shipped = (ROOT / "assets" / "tiny-florence-vl" / "chat_template.jinja").read_text()
    assert shipped == (ROOT / "chat_templates" / "llama3.jinja").read_text()


# ----------------------------------------------------------------------------------------- assistant masks
MULTI_TURN = [("What is it?", "Shapes."), ("Which colours?", "Red and blue, mostly.")]


def multi_turn_chat(image) -> list[dict]:
    chat = []
    for turn, (question, answer) in enumerate(MULTI_TURN):
        content = ([{"type": "image", "image": image}] if turn == 0 else []) + [{"type": "text", "text": question}]
        chat += [{"role": "user", "content": content},
                 {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return chat


@pytest.mark.parametrize("llm, end_of_turn", [("llama", "<|eot_id|>"), ("phi3", "<|end|>")])
def test_assistant_tokens_mask_marks_each_answer_and_its_end_of_turn(llm, end_of_turn):
    processor = tiny_processor(llm)
    out = processor.apply_chat_template(multi_turn_chat(fixture_image(0)), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = ids_of(out), out["assistant_masks"][0]
    assert len(mask) == len(ids) and ids.count(processor.image_token_id) == processor.image_seq_length
    # The masked tokens are exactly the answers and their end-of-turn tokens, in order, as contiguous runs.
    runs, run = [], []
    for token, masked in zip(ids, mask):
        if masked:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    decode = processor.tokenizer.decode
    assert [decode(r) for r in runs] == [answer + end_of_turn for _, answer in MULTI_TURN]


def test_generation_markers_change_no_rendered_text():
    """`{% generation %}` only marks spans: the rendered chat is the release's format, turn for turn."""
    processor = tiny_processor("llama")
    rendered = processor.apply_chat_template(multi_turn_chat(fixture_image(0)))
    token = processor.image_token
    assert rendered == (
        "<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user "
        "and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
        f"user's questions.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{token}\nWhat is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nShapes.<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nWhich colours?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nRed and blue, mostly.<|eot_id|>"
    )


# ----------------------------------------------------------------------------------------- what clients pass
def test_text_only_rows_in_a_nested_batch(processor):
    """`images=[[img], None]` (TRL, lmms-eval): the second prompt is text only."""
    image = fixture_image(0)
    prompts = [processor.apply_chat_template(user_turn("Q?", image), add_generation_prompt=True),
               processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)]
    out = processor(text=prompts, images=[[image], None], return_tensors="pt")
    assert out["pixel_values"].shape[0] == 1
    assert (out["input_ids"][1] == processor.image_token_id).sum() == 0
    assert (out["input_ids"][0] == processor.image_token_id).sum() == processor.image_seq_length


def test_padding_side_is_the_callers(processor):
    prompts = ["a", "b c d e"]
    right = processor(text=prompts, padding_side="right")["attention_mask"]
    left = processor(text=prompts)["attention_mask"]
    assert right[0][0] == 1 and right[0][-1] == 0  # as asked
    assert left[0][0] == 0 and left[0][-1] == 1  # the saved default: left, for generation


@pytest.mark.parametrize("name", ["videos", "audio", "audios"])
def test_other_modalities_are_ignored_with_a_warning_naming_them(processor, name):
    """As ProcessorMixin drops inputs a processor has no part for (transformers' conformance tests pass them all)."""
    with pytest.warns(UserWarning, match=f"images and text only: the {name} given are ignored"):
        out = processor(text="hi", **{name: [torch.zeros(4)]})
    assert dict(out) == dict(processor(text="hi"))


@pytest.mark.parametrize("name", ["videos", "audio"])
def test_empty_other_modalities_pass_silently(processor, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = processor(text="hi", **{name: [None]})
    assert dict(out) == dict(processor(text="hi"))


# ----------------------------------------------------------------------------------------- each release tokenizer
# The release prompts as the original code builds them (../shared/docs/florence_vl_facts.md), with <image> where the
# image goes: the text its tokenizer_image_token turns into ids.
ORIGINAL_PROMPTS = {
    "llama": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an "
              "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
              "user's questions.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\n{question}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "phi3": "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n",
}
VARIANT_CLIENTS = [processor_apply_chat_template, render_then_processor, render_then_processor_without_special_tokens,
                   lmms_eval_huggingface, trl_vision_collator]


CHUNK_IDS = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], config=AutoConfig.for_model("llama"))
print(json.dumps([[tokenizer(chunk)["input_ids"] for chunk in sys.argv[2].split("<image>")], tokenizer.bos_token_id]))
"""


@functools.lru_cache(maxsize=None)
def original_chunks(src, prompt: str) -> tuple[list[list[int]], int]:
    """The release tokenizer's own ids of each chunk of `prompt` split at <image>, under transformers 4.x as the
    original ran (here, or FLORENCE_VL_OTHER_PYTHON's 4.57 under 5.x: 5.x reads some tokenizers' BOS flag
    differently), and its BOS id."""
    python = sys.executable if IS_TRANSFORMERS_4 else os.environ.get("FLORENCE_VL_OTHER_PYTHON")
    if not python:
        pytest.skip("the expected ids come from transformers 4.x, the original's: FLORENCE_VL_OTHER_PYTHON names its "
                    "python (scripts/test.sh sets it)")
    result = subprocess.run([python, "-c", CHUNK_IDS, str(src), prompt], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    chunks, bos = json.loads(result.stdout.strip().splitlines()[-1])
    return chunks, bos


def original_ids(src, prompt: str, image_tokens: list[int]) -> list[int]:
    """LLaVA's tokenizer_image_token as the facts doc restates it, on the release tokenizer's chunks
    (`original_chunks`): a BOS that starts the first chunk is kept once and the first id of every chunk dropped; the
    image between the chunks (as its expanded image tokens)."""
    chunks, bos = original_chunks(src, prompt)
    offset = 1 if chunks[0][:1] == [bos] else 0
    ids = chunks[0][:offset]
    for index, chunk in enumerate(chunks):
        ids += (image_tokens if index else []) + chunk[offset:]
    return ids


def release_tokenizer(src):
    """The release's own tokenizer, as the original loads it (transformers cannot read a llava_* config.json, so the
    LLM's model type is given; the tokenizer class comes from tokenizer_config.json)."""
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(str(src), config=AutoConfig.for_model("llama"))


def phi3_tokenizer_variant(folder, variant: str) -> None:
    """Put tests/assets/phi3_tiny_tokenizer (Phi-3 specials, <s> and <|placeholder1|> in its 400 ids) into a release
    folder: as it is (adds no BOS), with a `<s> $A` post-processor in tokenizer.json, or as a Llama tokenizer class with
    add_bos_token in its config (which transformers 4.x honours: it adds <s>)."""
    from conftest import ASSETS

    tokenizer = json.loads((ASSETS / "phi3_tiny_tokenizer" / "tokenizer.json").read_text())
    config = json.loads((ASSETS / "phi3_tiny_tokenizer" / "tokenizer_config.json").read_text())
    if variant == "post_processor":
        bos = {"id": "<s>", "type_id": 0}
        tokenizer["post_processor"] = {
            "type": "TemplateProcessing", "single": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": bos},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    elif variant == "flag":  # as Phi-3.5's own tokenizer_config.json is written: a Llama class and the flag
        config.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Tiny releases in the original format, each with one variant of its family's tokenizer, and their conversions:
    {(family, variant): (release folder, converted folder)}."""
    import shutil

    import convert_checkpoint
    from test_conversion import build_tiny_phi_release

    made = {}
    root = tmp_path_factory.mktemp("tokenizer_variants")
    llama = root / "llama-adds_bos"
    shutil.copytree(FIXTURE / "original_checkpoint", llama)
    made[("llama", "adds_bos")] = llama
    for variant in ("no_bos", "post_processor", "flag"):
        phi3 = build_tiny_phi_release(root / f"phi3-{variant}")
        phi3_tokenizer_variant(phi3, variant)
        made[("phi3", variant)] = phi3
    converted = {}
    for key, src in made.items():
        convert_checkpoint.convert(str(src), str(root / f"{src.name}-converted"))
        converted[key] = (src, root / f"{src.name}-converted")
    return converted


@pytest.mark.parametrize("client", VARIANT_CLIENTS, ids=lambda client: client.__name__)
@pytest.mark.parametrize("release", [("llama", "adds_bos"), ("phi3", "no_bos"), ("phi3", "post_processor"),
                                     ("phi3", "flag")], ids="-".join)
def test_every_client_gets_each_release_tokenizers_original_ids(releases, release, client):
    """Whatever the release tokenizer adds, the converted folder gives every client the ids the original builds with
    that tokenizer (expected ids from the tokenizer's own call, never from our processor)."""
    from transformers import AutoProcessor

    src, converted = releases[release]
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    question = "What is in the image?"
    image = fixture_image(0)
    expected = original_ids(src, ORIGINAL_PROMPTS[release[0]].format(question=question),
                            [processor.image_token_id] * processor.image_seq_length)
    assert client(processor, user_turn(question, image), image) == expected
    bos = release_tokenizer(src).bos_token_id
    assert (expected[0] == bos) == (release != ("phi3", "no_bos"))  # the variants do differ: see their builder


def test_a_llama3_release_tokenizer_without_bos_is_refused_by_name(tmp_path, capsys):
    """The template's literal <|begin_of_text|> would make the original drop the first id after every image: no chat
    template gives those ids, so the converter refuses, naming why."""
    import shutil

    import convert_checkpoint

    src = tmp_path / "llama-no_bos"
    shutil.copytree(FIXTURE / "original_checkpoint", src)
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (src / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(convert_checkpoint.ConversionError, match="Llama-3 tokenizer adds no BOS.*first id after"):
        convert_checkpoint.convert(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("release", [("phi3", "no_bos"), ("phi3", "post_processor")], ids="-".join)
def test_pipeline_gives_each_release_tokenizers_original_ids(releases, release):
    """The image-text-to-text pipeline on chat messages hands `generate` the original's ids for that tokenizer."""
    from transformers import pipeline

    src, converted = releases[release]
    pipe = pipeline("image-text-to-text", model=str(converted), trust_remote_code=True)
    seen = []
    generate = pipe.model.generate
    pipe.model.generate = lambda *args, **kwargs: seen.append(kwargs["input_ids"][0].tolist()) or generate(*args, **kwargs)
    question, image = "What is in the image?", fixture_image(0)
    pipe(text=user_turn(question, image), max_new_tokens=1)
    image_tokens = [pipe.processor.image_token_id] * pipe.processor.image_seq_length
    assert seen == [original_ids(src, ORIGINAL_PROMPTS["phi3"].format(question=question), image_tokens)]
