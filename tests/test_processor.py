"""FlorenceVLProcessor: pixel values and prompt ids as the original release (fixture), image inputs, chat formats."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import CHAT_TEMPLATES, require_fixture, tiny_processor

from florence_vl.compatibility_florence_vl import IS_TRANSFORMERS_4
from florence_vl.configuration_florence_vl import IMAGE_TOKENS

FIXTURE = require_fixture()
CASES = json.loads((FIXTURE / "cases.json").read_text())["cases"]
EXPECTED = load_file(str(FIXTURE / "expected.safetensors"))
IMAGE_SEQ_LENGTH = 577
LLAMA_IMAGE, PHI3_IMAGE = IMAGE_TOKENS["llama"], IMAGE_TOKENS["phi3"]
MARKER = re.escape(LLAMA_IMAGE)
# From the facts doc: pad colour, ImageNet mean/std, and the two default system prompts.
PAD = (123, 116, 103)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# The template writes both BOS of the release's ids (its text's and the one its tokenizer added).
BOS_BOS = "<|begin_of_text|><|begin_of_text|>"
LLAMA_SYSTEM = (
    "<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."
    "<|eot_id|>"
)
PHI3_SYSTEM = "<|system|>\nYou are a helpful AI assistant.<|end|>\n"


@pytest.fixture(scope="module")
def processor():
    return tiny_processor("llama")


@pytest.fixture(scope="module")
def phi3_processor():
    return tiny_processor("phi3")


def fixture_image(index: int) -> Image.Image:
    image = Image.open(FIXTURE / CASES[index]["image"])
    image.load()
    return image


def expected_pixels(index: int) -> torch.Tensor:
    return EXPECTED[f"case{index}.pixel_values"]


def expected_ids(index: int, image_token_id: int) -> list[int]:
    """The fixture's prompt ids with the original's -200 placeholder expanded to 577 image tokens."""
    ids = EXPECTED[f"case{index}.input_ids_with_image_index"][0].tolist()
    at = ids.index(-200)
    return ids[:at] + [image_token_id] * IMAGE_SEQ_LENGTH + ids[at + 1 :]


def user_turn(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def pixels_of(processor, image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"]


def assert_pixels(actual: torch.Tensor, index: int) -> None:
    assert actual.shape == (1, 3, 768, 768)
    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected_pixels(index))  # exactly: the stock PIL pipeline is the original's


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """An 8-bit colour after the facts doc's rescale and ImageNet normalisation, shape (3,)."""
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, MEAN, STD)])


# ----------------------------------------------------------------------------------------- fixture parity
@pytest.mark.parametrize("index", range(3))
def test_chat_template_renders_the_original_prompt(processor, index):
    case = CASES[index]
    rendered = processor.apply_chat_template(user_turn(fixture_image(index), case["question"]), add_generation_prompt=True)
    # The release's text with the BOS its tokenizer added written out, the image token where it writes `<image>`.
    assert rendered == "<|begin_of_text|>" + case["prompt"].replace("<image>", processor.image_token)


@pytest.mark.parametrize("index", range(3))
def test_apply_chat_template_matches_fixture_ids_and_pixels(processor, index):
    case = CASES[index]
    out = processor.apply_chat_template(
        user_turn(fixture_image(index), case["question"]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}  # no token_type_ids
    assert out["input_ids"].shape == (1, 81 + IMAGE_SEQ_LENGTH)
    assert out["input_ids"][0].tolist() == expected_ids(index, processor.image_token_id)
    assert out["input_ids"][0, :2].tolist() == [0, 0]  # the release's two BOS
    assert out["attention_mask"].all()
    assert_pixels(out["pixel_values"], index)


@pytest.mark.parametrize("add_special_tokens", [None, True, False])
@pytest.mark.parametrize("index", range(3))
def test_rendered_prompt_then_processor_matches_fixture(processor, index, add_special_tokens):
    """The two-step flow (render, then call the processor), with and without add_special_tokens: the same ids."""
    case = CASES[index]
    prompt = processor.apply_chat_template(user_turn(fixture_image(index), case["question"]), add_generation_prompt=True)
    flags = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    out = processor(images=fixture_image(index), text=prompt, return_tensors="pt", **flags)
    assert "token_type_ids" not in out
    assert out["input_ids"][0].tolist() == expected_ids(index, processor.image_token_id)
    assert_pixels(out["pixel_values"], index)


def test_image_token_and_length_are_configured(processor):
    assert processor.image_token == LLAMA_IMAGE
    assert processor.image_seq_length == IMAGE_SEQ_LENGTH
    # A reserved special token of the fixture tokenizer: inside the LLM's 400-row embedding table, no token added.
    assert processor.image_token_id == 5
    assert len(processor.tokenizer) == 400


def test_unknown_image_token_is_refused(processor):
    with pytest.raises(ValueError, match="<image>.*not a token of this tokenizer"):
        type(processor)(tokenizer=processor.tokenizer, image_token="<image>")


# ----------------------------------------------------------------------------------------- image inputs
def _case0_as_palette() -> Image.Image:
    image = fixture_image(0).convert("RGB")
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    # Precondition: the drawing has few colours, so the palette image holds exactly the same pixels.
    assert np.array_equal(np.asarray(palette.convert("RGB")), np.asarray(image))
    return palette


def _case2_as_i16() -> Image.Image:
    grey = np.asarray(fixture_image(2))
    assert fixture_image(2).mode == "L"
    return Image.fromarray(grey.astype(np.uint16))  # 16-bit, values 0..255: convert("RGB") keeps them


def _with_alpha(image: Image.Image, mode: str) -> Image.Image:
    out = image.convert(mode)
    alpha = Image.fromarray(np.tile(np.arange(out.width, dtype=np.uint8), (out.height, 1)))
    out.putalpha(alpha)  # any alpha: the original drops it with convert("RGB")
    return out


IMAGE_MODES = {
    "RGB": (lambda: fixture_image(0).convert("RGB"), 0),
    "RGBA": (lambda: _with_alpha(fixture_image(0), "RGBA"), 0),
    "P": (_case0_as_palette, 0),
    "CMYK": (lambda: fixture_image(0).convert("RGB").convert("CMYK"), 0),
    "L": (lambda: fixture_image(2), 2),
    "LA": (lambda: _with_alpha(fixture_image(2), "LA"), 2),
    "I;16": (_case2_as_i16, 2),
}


@pytest.mark.parametrize("mode", list(IMAGE_MODES))
def test_every_pil_mode_matches_fixture(processor, mode):
    make, index = IMAGE_MODES[mode]
    image = make()
    assert image.mode == mode or (mode == "I;16" and image.mode.startswith("I"))
    assert_pixels(pixels_of(processor, image), index)


def test_16_bit_images_are_clipped_at_255_as_the_original_does(processor):
    """Pillow's convert("RGB") of a 16-bit image clips each value at 255 (the original's behaviour, kept)."""
    bright = Image.fromarray(np.full((40, 60), 4000, dtype=np.uint16))  # 16-bit values far above 255
    dark = Image.fromarray(np.full((40, 60), 100, dtype=np.uint16))
    white = normalised((255, 255, 255))
    assert (pixels_of(processor, bright)[0, :, 384, 384] - white).abs().max().item() <= 1e-5
    assert (pixels_of(processor, dark)[0, :, 384, 384] - normalised((100, 100, 100))).abs().max().item() <= 1e-5


def test_numpy_hwc_uint8(processor):
    array = np.asarray(fixture_image(1).convert("RGB"))
    assert array.shape == (500, 300, 3) and array.dtype == np.uint8
    assert_pixels(pixels_of(processor, array), 1)


def test_numpy_greyscale_2d(processor):
    assert_pixels(pixels_of(processor, np.asarray(fixture_image(2))), 2)


@pytest.mark.parametrize("layout", ["chw_uint8", "hwc_uint8"])
def test_torch_tensors(processor, layout):
    hwc = torch.from_numpy(np.asarray(fixture_image(1).convert("RGB")).copy())
    tensor = {"chw_uint8": hwc.permute(2, 0, 1), "hwc_uint8": hwc}[layout]
    assert_pixels(pixels_of(processor, tensor), 1)


@pytest.mark.parametrize("array", [torch.rand(3, 32, 32), np.random.default_rng(0).random((32, 32, 3))])
def test_float_arrays_are_refused_by_name(processor, array):
    """Float images (torchvision's to_tensor convention) would be padded and rescaled as 0-255 values: refused."""
    with pytest.raises(TypeError, match="0-255 integers"):
        processor(images=array)


def test_path_string_and_pathlib(processor):
    path = FIXTURE / CASES[1]["image"]
    assert_pixels(pixels_of(processor, str(path)), 1)
    assert_pixels(pixels_of(processor, path), 1)


def test_base64_string(processor):
    buffer = io.BytesIO()
    fixture_image(0).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    assert_pixels(pixels_of(processor, encoded), 0)


def test_url_goes_through_transformers_loader(processor, monkeypatch):
    """URLs are fetched by transformers.image_utils.load_image (offline here: its fetch is stubbed)."""
    import florence_vl.processing_florence_vl as module

    seen = []

    def fake_load_image(source, *args, **kwargs):
        seen.append(source)
        return Image.open(FIXTURE / CASES[0]["image"])

    monkeypatch.setattr(module, "load_image", fake_load_image)
    assert_pixels(pixels_of(processor, "https://example.com/shapes.png"), 0)
    assert seen == ["https://example.com/shapes.png"]


def test_batch_of_images(processor):
    images = [fixture_image(i) for i in range(3)]
    pixels = pixels_of(processor, images)
    assert pixels.shape == (3, 3, 768, 768)
    for index in range(3):
        assert (pixels[index] - expected_pixels(index)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("colour", [PAD, (255, 0, 0), (3, 200, 77)])
def test_one_by_one_image(processor, colour):
    pixels = pixels_of(processor, Image.new("RGB", (1, 1), colour))
    assert pixels.shape == (1, 3, 768, 768)
    expected = normalised(colour)[:, None, None].expand(3, 768, 768)
    assert (pixels[0] - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", [(4000, 20), (20, 4000)])
def test_extreme_aspect_ratio_is_padded_centred(processor, size):
    """A white 4000x20 strip: padded with the mean colour to 4000x4000 (strip at rows 1990..2009), then 768x768."""
    pixels = pixels_of(processor, Image.new("RGB", size, (255, 255, 255)))[0]
    assert pixels.shape == (3, 768, 768)
    if size[0] < size[1]:
        pixels = pixels.transpose(1, 2)  # portrait: the strip is a column; compare as rows
    pad = normalised(PAD)[:, None, None]
    white = normalised((255, 255, 255))
    # The strip maps to output rows 382.1..385.9; bicubic reaches about 2 output rows beyond it.
    assert (pixels[:, :375] - pad).abs().max().item() <= 1e-5
    assert (pixels[:, 393:] - pad).abs().max().item() <= 1e-5
    assert (pixels[:, 384] > white[:, None] * 0.5).all()


# ----------------------------------------------------------------------------------------- markers and images
def test_each_marker_expands_to_image_seq_length_tokens(processor):
    text = f"{LLAMA_IMAGE}\n{LLAMA_IMAGE}\nCompare them."
    out = processor(images=[[fixture_image(0), fixture_image(1)]], text=[text], return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 768, 768)
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 2 * IMAGE_SEQ_LENGTH
    assert (out["pixel_values"][1] - expected_pixels(1)[0]).abs().max().item() <= 1e-5


def test_more_markers_than_images(processor):
    with pytest.raises(ValueError, match=rf"2 {MARKER} markers but 1 images"):
        processor(images=fixture_image(0), text=f"{LLAMA_IMAGE}\n{LLAMA_IMAGE}\nQ")


def test_images_without_markers(processor):
    with pytest.raises(ValueError, match=rf"0 {MARKER} markers but 1 images"):
        processor(images=fixture_image(0), text="What is this?")


def test_markers_without_images(processor):
    with pytest.raises(ValueError, match=rf"1 {MARKER} markers but 0 images"):
        processor(text=f"{LLAMA_IMAGE}\nWhat is this?")


def test_per_sample_mismatch(processor):
    with pytest.raises(ValueError, match=rf"\[1, 1\] {MARKER} markers per sample but \[2, 0\] images"):
        processor(images=[[fixture_image(0), fixture_image(1)], []], text=[f"{LLAMA_IMAGE}\nA", f"{LLAMA_IMAGE}\nB"])


def test_images_only(processor):
    out = processor(images=fixture_image(0), return_tensors="pt")
    assert set(out.keys()) == {"pixel_values"}


def test_text_only(processor):
    out = processor(text="Hello", return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    # The tokenizer adds no BOS of its own: the chat template writes every special token.
    assert out["input_ids"][0].tolist() == processor.tokenizer("Hello", add_special_tokens=False)["input_ids"]
    assert 0 not in out["input_ids"][0].tolist()


# ----------------------------------------------------------------------------------------- chat formats
def test_multi_turn_llama3(processor):
    chat = user_turn(fixture_image(0), "What is it?") + [
        {"role": "assistant", "content": [{"type": "text", "text": "Shapes."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colours?"}]},
    ]
    expected = (
        LLAMA_SYSTEM
        + f"<|start_header_id|>user<|end_header_id|>\n\n{LLAMA_IMAGE}\nWhat is it?<|eot_id|>"
        + "<|start_header_id|>assistant<|end_header_id|>\n\nShapes.<|eot_id|>"
        + "<|start_header_id|>user<|end_header_id|>\n\nWhich colours?<|eot_id|>"
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == expected
    assert processor.apply_chat_template(chat) == expected[: -len("<|start_header_id|>assistant<|end_header_id|>\n\n")]
    out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = out["input_ids"][0] if isinstance(out["input_ids"][0], list) else out["input_ids"]
    assert ids[:2] == [0, 0]
    assert ids.count(processor.image_token_id) == IMAGE_SEQ_LENGTH


def test_system_prompt_replaces_default_llama3(processor):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == (
        BOS_BOS + "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_image_after_text_is_rendered_where_it_occurs(processor):
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look: "},
                {"type": "image", "image": fixture_image(0)},
                {"type": "text", "text": "what is it?"},
            ],
        }
    ]
    rendered = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert rendered == (
        LLAMA_SYSTEM + f"<|start_header_id|>user<|end_header_id|>\n\nLook: {LLAMA_IMAGE}\nwhat is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_batched_chats_are_left_padded(processor):
    short = user_turn(fixture_image(0), "Hi?")
    long = user_turn(fixture_image(1), CASES[1]["question"] + " Please be thorough and precise.")
    singles = [
        processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for chat in (short, long)
    ]
    singles = [ids[0] if isinstance(ids[0], list) else ids for ids in singles]
    out = processor.apply_chat_template(
        [short, long], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert out["input_ids"].shape == (2, max(map(len, singles)))
    assert out["pixel_values"].shape == (2, 3, 768, 768)
    assert (out["pixel_values"][1] - expected_pixels(1)[0]).abs().max().item() <= 1e-5
    pad_id = processor.tokenizer.pad_token_id
    for row, ids in enumerate(singles):
        width = len(ids)
        n_pad = out["input_ids"].shape[1] - width
        assert out["input_ids"][row, n_pad:].tolist() == ids
        assert out["input_ids"][row, :n_pad].tolist() == [pad_id] * n_pad
        assert out["attention_mask"][row].tolist() == [0] * n_pad + [1] * width
    assert len(singles[0]) < len(singles[1])


def test_phi3_template_exact_string(phi3_processor):
    rendered = phi3_processor.apply_chat_template(user_turn(fixture_image(0), "Q"), add_generation_prompt=True)
    # Verbatim from the facts doc (Phi-3.5, 3B).
    assert rendered == f"<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n{PHI3_IMAGE}\nQ<|end|>\n<|assistant|>\n"


def test_phi3_multi_turn_and_ids(phi3_processor):
    chat = user_turn(fixture_image(0), "What is it?") + [
        {"role": "assistant", "content": [{"type": "text", "text": "Shapes."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colours?"}]},
    ]
    rendered = phi3_processor.apply_chat_template(chat, add_generation_prompt=True)
    assert rendered == (
        PHI3_SYSTEM + f"<|user|>\n{PHI3_IMAGE}\nWhat is it?<|end|>\n<|assistant|>\nShapes.<|end|>\n"
        "<|user|>\nWhich colours?<|end|>\n<|assistant|>\n"
    )
    out = phi3_processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = out["input_ids"][0].tolist()
    tok = phi3_processor.tokenizer
    # Phi-3's tokenizer adds no BOS: the ids start with <|system|>.
    assert ids[0] == tok.convert_tokens_to_ids("<|system|>")
    assert ids.count(phi3_processor.image_token_id) == IMAGE_SEQ_LENGTH
    assert ids.count(tok.convert_tokens_to_ids("<|end|>")) == 4
    assert_pixels(out["pixel_values"], 0)


def test_phi3_system_prompt_replaces_default(phi3_processor):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = phi3_processor.apply_chat_template(chat, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"


# ----------------------------------------------------------------------------------------- decoding
def test_decode_and_post_process(processor):
    ids = processor.tokenizer("<|start_header_id|>user<|end_header_id|> hello world", add_special_tokens=True)[
        "input_ids"
    ]
    with_image = ids[:3] + [processor.image_token_id] * 3 + ids[3:]
    plain = processor.decode(ids, skip_special_tokens=True)
    assert plain == "user hello world"
    assert processor.decode(with_image, skip_special_tokens=True) == plain  # the image tokens vanish too
    assert processor.batch_decode([with_image, ids], skip_special_tokens=True) == [plain, plain]
    assert processor.post_process_image_text_to_text(torch.tensor([with_image, with_image])) == [plain, plain]
    assert processor.post_process_image_text_to_text(torch.tensor(with_image)) == [plain]


# ----------------------------------------------------------------------------------------- saving and loading
def test_save_and_auto_load(processor, tmp_path):
    from transformers import AutoProcessor

    folder = tmp_path / "florence_vl_processor_roundtrip"
    processor.save_pretrained(str(folder))
    assert (folder / "processing_florence_vl.py").is_file()
    assert (folder / "chat_template.jinja").read_text() == (CHAT_TEMPLATES / "llama3.jinja").read_text()
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["image_seq_length"] == IMAGE_SEQ_LENGTH
    assert processor_config["image_token"] == LLAMA_IMAGE
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_florence_vl.FlorenceVLProcessor"
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] != "TokenizersBackend"
    assert not isinstance(tokenizer_config.get("extra_special_tokens"), list)
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_processor_type"] == "LlavaImageProcessor"
    assert (folder / "compatibility_florence_vl.py").is_file()  # imported by the processor: shipped with it

    loaded = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    assert type(loaded).__name__ == "FlorenceVLProcessor"
    assert loaded.image_token_id == processor.image_token_id
    assert loaded.image_seq_length == IMAGE_SEQ_LENGTH
    assert type(loaded.image_processor) is type(processor.image_processor)  # the pinned PIL backend
    out = loaded.apply_chat_template(
        user_turn(fixture_image(2), CASES[2]["question"]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert out["input_ids"][0].tolist() == expected_ids(2, processor.image_token_id)
    assert_pixels(out["pixel_values"], 2)


def test_other_image_processor_backend_is_repinned_to_pil(processor):
    """An image processor of another class (where torchvision is installed, AutoImageProcessor returns the torchvision
    Llava backend; a stand-in subclass here, torchvision being absent) is rebuilt, settings kept, as the PIL one."""
    from florence_vl.processing_florence_vl import FlorenceVLProcessor

    other_cls = type("OtherBackend", (type(processor.image_processor),), {})
    other = other_cls(do_pad=True, size={"height": 768, "width": 768}, resample=3, do_center_crop=False,
                      image_mean=list(MEAN), image_std=list(STD))
    repinned = FlorenceVLProcessor(image_processor=other, tokenizer=processor.tokenizer)
    assert type(repinned.image_processor) is type(processor.image_processor)
    assert_pixels(pixels_of(repinned, fixture_image(1)), 1)


# ----------------------------------------------------------------------------------------- serving-engine protocol
def test_num_multimodal_tokens_is_577_tokens_and_one_patch_per_image(processor):
    data = processor._get_num_multimodal_tokens(image_sizes=[(480, 640), (20, 4000), (1, 1)])
    assert data.num_image_tokens == [IMAGE_SEQ_LENGTH] * 3
    assert data.num_image_patches == [1] * 3
    assert processor.replace_image_token({}, 0) == LLAMA_IMAGE * IMAGE_SEQ_LENGTH


def test_mm_token_type_ids_mark_exactly_the_image_tokens(processor):
    text = f"{LLAMA_IMAGE}\nA and {LLAMA_IMAGE}\nB"
    out = processor(images=[fixture_image(0), fixture_image(1)], text=text, return_mm_token_type_ids=True)
    ids, types = out["input_ids"][0], out["mm_token_type_ids"][0]
    assert types == [int(i == processor.image_token_id) for i in ids]
    assert sum(types) == 2 * IMAGE_SEQ_LENGTH


@pytest.mark.skipif(IS_TRANSFORMERS_4, reason="replacement offsets are transformers 5.x's")
def test_text_replacement_offsets_report_one_replacement_per_image(processor):
    text = f"Look: {LLAMA_IMAGE}\nand {LLAMA_IMAGE}\nnow"
    out = processor(images=[fixture_image(0), fixture_image(1)], text=text, return_text_replacement_offsets=True,
                    return_tensors="pt")
    offsets = out["text_replacement_offsets"][0]
    assert [o["type"] for o in offsets] == ["image", "image"]
    assert all(text[o["span"][0]:o["span"][1]] == LLAMA_IMAGE for o in offsets)
    assert all(o["replacement"] == LLAMA_IMAGE * IMAGE_SEQ_LENGTH for o in offsets)
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 2 * IMAGE_SEQ_LENGTH


@pytest.mark.skipif(not IS_TRANSFORMERS_4, reason="transformers 4.x only")
def test_text_replacement_offsets_need_transformers_5(processor):
    with pytest.raises(ValueError, match="needs transformers 5"):
        processor(images=fixture_image(0), text=LLAMA_IMAGE, return_text_replacement_offsets=True)
