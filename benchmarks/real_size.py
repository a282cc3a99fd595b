"""The releases end to end at their real size: write random-weight releases in the ORIGINAL format, convert, load,
generate, serve, and check the rope settings, printing every figure.

    python benchmarks/real_size.py                 # real size (8B and 3B shapes): tens of GB of disk, ~30 min on 2 cores
    python benchmarks/real_size.py --size tiny     # the same code on shrunken releases (what CI runs)

scripts/real_size_check.sh is the documented command (it names the Python of each virtualenv). The releases are
written from ../shared/fixtures/real_size_manifests.json (every tensor's name and shape, bfloat16) and the configs in
benchmarks/real_releases.json, sharded as the releases are (5 GB shards, an index; the 8B's tower inside its shards
and as its own `vision_tower/` folder). Their tokenizers are synthetic (byte-level, no merges) with the real vocabulary
size and the real special tokens at their real ids: the prompt rule is read off them by the converter as off the real
ones. At --size tiny the LLMs shrink (2 layers, the real head sizes, vocabularies and rope settings) and the tower is
the fixture's. Each step runs in its own process, so its peak RSS (os.wait4) and time are its own; the run's peak disk
use is sampled throughout. Everything is written under one temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the converter's helpers (the steps import them; this process does not)
SHARED = Path(os.environ.get("FLORENCE_VL_SHARED", ROOT.parent / "shared"))
MANIFESTS = SHARED / "fixtures" / "real_size_manifests.json"
RELEASES = ROOT / "benchmarks" / "real_releases.json"
FIXTURE_TOWER = SHARED / "fixtures" / "florence_vl_tiny_llama" / "original_checkpoint" / "vision_tower"
NAMES = {"8b": "florence_vl_8b_llava_llama", "3b": "florence_vl_3b_llava_phi"}
GIB = 1024 ** 3
SHARD_BYTES = 5 * 10 ** 9  # save_pretrained's default in the releases' transformers 4.43 ("5GB")
RESULT = "RESULT "  # the line a step prints its figures on
QUESTION = "Describe the image."
# At --size tiny: the LLM's shape, with the real head size (so the real rope factors fit) and the real vocabulary.
TINY_LLM = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


# ------------------------------------------------------------------------------------------------ writing a release
def release_config(key: str, size: str) -> dict[str, Any]:
    """The release's config.json as the original saved it; at --size tiny, its LLM shrunk (head size kept)."""
    config = dict(json.loads(RELEASES.read_text())[NAMES[key]])
    if size == "tiny":
        head = config["hidden_size"] // config["num_attention_heads"]
        config.update(TINY_LLM, hidden_size=head * TINY_LLM["num_attention_heads"],
                      num_key_value_heads=1 if key == "8b" else TINY_LLM["num_attention_heads"],
                      mm_hidden_size=json.loads((FIXTURE_TOWER / "config.json").read_text())["projection_dim"])
    return config


def llm_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The LLaVA release's LLM and projector tensors (names as the original saves them) for `config`."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        if config["model_type"] == "llava_phi":  # Phi-3's fused projections
            shapes.update({p + "self_attn.qkv_proj.weight": (hidden + 2 * kv, hidden),
                           p + "mlp.gate_up_proj.weight": (2 * inter, hidden)})
        else:
            shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                           p + "self_attn.v_proj.weight": (kv, hidden), p + "mlp.gate_proj.weight": (inter, hidden),
                           p + "mlp.up_proj.weight": (inter, hidden)})
        shapes.update({p + "self_attn.o_proj.weight": (hidden, hidden), p + "mlp.down_proj.weight": (hidden, inter),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    shapes["model.norm.weight"] = (hidden,)
    shapes.update({"model.mm_projector.encoder_mlp.0.weight": (hidden, 4 * config["mm_hidden_size"]),
                   "model.mm_projector.encoder_mlp.0.bias": (hidden,)})
    for i in (1, 2):
        shapes.update({f"model.mm_projector.encoder_mlp.{i}.1.weight": (hidden, hidden),
                       f"model.mm_projector.encoder_mlp.{i}.1.bias": (hidden,)})
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def release_tensors(key: str, size: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the release, in the order the shards hold them. At real size: the manifest, after checking that
    its LLM and projector are what `config` gives (so the shrunken releases are built by the same rules)."""
    from convert_checkpoint import TOWER_PREFIX

    shapes = llm_shapes(config)
    if size == "tiny":
        from safetensors import safe_open

        with safe_open(str(FIXTURE_TOWER / "model.safetensors"), "pt") as tower:
            shapes.update({TOWER_PREFIX + k: tuple(tower.get_slice(k).get_shape()) for k in tower.keys()})
        return shapes
    manifest = {name: tuple(shape) for name, shape in json.loads(MANIFESTS.read_text())[NAMES[key]].items()}
    llm = {name: shape for name, shape in manifest.items() if not name.startswith(TOWER_PREFIX)}
    if llm != shapes:
        raise SystemExit(f"error: {NAMES[key]}: the manifest's LLM/projector tensors differ from its config's "
                         f"({sorted(set(llm.items()) ^ set(shapes.items()))[:4]} ...)")
    return manifest


def random_tensor(name: str, shape: tuple[int, ...], generator: Any) -> Any:
    """A bfloat16 tensor that keeps activations in range: norms 1, biases 0, weights N(0, 0.02); the tiny tower keeps
    the fixture's trained-shape weights."""
    import torch

    if len(shape) == 1 and "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if len(shape) == 1 and name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write_shards(folder: Path, tensors: dict[str, tuple[int, ...]], values: Any, max_bytes: int) -> list[int]:
    """Stream `tensors` (name -> shape; `values(name, shape)` makes each) into bfloat16 safetensors shards of at most
    `max_bytes` plus an index, one tensor in memory at a time; returns the shard sizes."""
    import torch

    from convert_checkpoint import safetensors_header

    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in tensors.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, sizes = {}, []
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with open(folder / file, "wb") as out:
            out.write(safetensors_header([(n, tensors[n], torch.bfloat16) for n in names]))
            for name in names:
                tensor = values(name, tensors[name]).contiguous()
                out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                weight_map[name] = file
        sizes.append((folder / file).stat().st_size)
    index = {"metadata": {"total_size": sum(2 * int(torch.Size(s).numel()) for s in tensors.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sizes


def byte_level_tokenizer(base: dict[int, str], specials: dict[int, str], bos: Optional[str]) -> Any:
    """A byte-level tokenizer without merges (every byte its own token) holding `base` regular ids and the given
    special tokens at their ids; a TemplateProcessing post-processor adds `bos` to each call when given."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in base.items()}
    free = (index for index in range(len(base) + len(alphabet) + 1) if index not in base)
    for char in alphabet:
        vocab[char] = next(free)
    first_added = min(index for index, token in specials.items() if base.get(index) != token)
    while len(vocab) < first_added:  # the rest of the regular vocabulary: tokens no text produces
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    for index in sorted(specials):
        if specials[index] not in vocab:
            assert tokenizer.get_vocab_size() == index, (index, tokenizer.get_vocab_size())
        tokenizer.add_special_tokens([AddedToken(specials[index], special=True, normalized=False)])
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def write_tokenizer(key: str, folder: Path) -> None:
    """The release tokenizer's special tokens at their real ids and its real vocabulary size, saved as the release
    ships it. 8B: Llama-3.1's (a post-processor adds <|begin_of_text|>; <pad> added at 128256). 3B: Phi-3.5's
    (`<s>` = 1, the chat tokens from 32000; a Llama tokenizer class with add_bos_token false, as Phi-3.5-mini-instruct's
    tokenizer_config.json is published)."""
    from transformers import PreTrainedTokenizerFast

    if key == "8b":
        named = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
                 128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
                 128010: "<|python_tag|>"}
        reserved = (i for i in range(256))
        specials = {i: named.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(128000, 128256)}
        specials[128256] = "<pad>"
        tokenizer = byte_level_tokenizer({}, specials, bos="<|begin_of_text|>")
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                          eos_token="<|eot_id|>", pad_token="<pad>")
        extra = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072}
    else:
        chat = {32000: "<|endoftext|>", 32001: "<|assistant|>", 32006: "<|system|>", 32007: "<|end|>", 32010: "<|user|>"}
        placeholders = iter(range(1, 7))
        specials = {i: chat.get(i) or f"<|placeholder{next(placeholders)}|>" for i in range(32000, 32011)}
        base = {0: "<unk>", 1: "<s>", 2: "</s>"}
        tokenizer = byte_level_tokenizer(base, {**base, **specials}, bos=None)
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>",
                                          unk_token="<unk>", pad_token="<|endoftext|>")
        extra = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                 "model_max_length": 131072}
    wrapped.save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=2))


def tower_folder_config() -> dict[str, Any]:
    """Florence-2-large's config.json in the original remote-code format, as the tower's own repo ships it."""
    return json.loads(RELEASES.read_text())["_florence2_large_tower_config"]


def step_write(key: str, size: str, folder: str) -> dict[str, Any]:
    """Write the release (shards + index, config, generation config, tokenizer; the 8B also its tower folder)."""
    import torch
    from safetensors.torch import load_file

    from convert_checkpoint import TOWER_PREFIX

    out = Path(folder)
    out.mkdir(parents=True)
    config = release_config(key, size)
    tensors = release_tensors(key, size, config)
    generator = torch.Generator().manual_seed(0)
    tower = load_file(str(FIXTURE_TOWER / "model.safetensors")) if size == "tiny" else {}

    def values(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.startswith(TOWER_PREFIX) and tower:
            return tower[name[len(TOWER_PREFIX):]].to(torch.bfloat16)
        return random_tensor(name, shape, generator)

    max_bytes = SHARD_BYTES if size == "real" else sum(2 * torch.Size(s).numel() for s in tensors.values()) // 2 + 1
    sizes = write_shards(out, tensors, values, max_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_tokenizer(key, out)
    if size == "tiny" and key == "3b":  # the fixture's tower is not Florence-2-large: its config, as the fixture has it
        (out / "vision_tower").mkdir()
        (out / "vision_tower" / "config.json").write_text((FIXTURE_TOWER / "config.json").read_text())
    if key == "8b":  # the tower also as its own folder (bare Florence-2 names), the same values as in the shards
        folder_tower = out / "vision_tower"
        folder_tower.mkdir()
        tower_tensors = {n[len(TOWER_PREFIX):]: s for n, s in tensors.items() if n.startswith(TOWER_PREFIX)}
        from safetensors import safe_open

        handles = {f: safe_open(str(out / f), "pt") for f in sorted({p.name for p in out.glob("model-*.safetensors")})}
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        write_shards(folder_tower, tower_tensors,
                     lambda n, s: handles[index[TOWER_PREFIX + n]].get_tensor(TOWER_PREFIX + n), SHARD_BYTES)
        config_path = FIXTURE_TOWER / "config.json" if size == "tiny" else None
        (folder_tower / "config.json").write_text(config_path.read_text() if config_path
                                                  else json.dumps(tower_folder_config(), indent=2))
    return {"shards": len(sizes), "largest_shard": max(sizes), "bytes": sum(sizes)}


# ------------------------------------------------------------------------------------------- running the converted
def chat(question: str = QUESTION) -> list[dict[str, Any]]:
    """One user turn: the example image, then the question."""
    return [{"role": "user", "content": [{"type": "image", "url": str(ROOT / "assets" / "example.png")},
                                         {"type": "text", "text": question}]}]


def bare_llm(model: Any) -> Any:
    """The plain causal LM of the same shape, sharing the model's own LLM weights (no second copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(model.config.text_config)
    llm.model, llm.lm_head = model.model.language_model, model.lm_head
    return llm.eval()


def decode_seconds(model: Any, inputs: dict[str, Any], rounds: int) -> list[float]:
    """Seconds per decode step of `model` after a prefill of `inputs` (one new token at a time, cache kept)."""
    import torch

    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        length = inputs["input_ids"].shape[1]
        times = []
        for step in range(rounds + 1):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True,
                        attention_mask=torch.ones(1, length + step + 1, dtype=torch.long))
            times.append(time.perf_counter() - start)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return times[1:]  # the first step warms up


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max."""
    ordered = sorted(values)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1]}


def step_generate(folder: str, tokens: int, rounds: int) -> dict[str, Any]:
    """Load the converted folder in bfloat16 on the CPU, answer an image chat greedily, time its parts, and check it:
    the pipeline's answer to the same chat is the same, another image changes the logits."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    load_s = time.perf_counter() - start
    inputs = processor.apply_chat_template(chat(), add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    settings = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens)
    with torch.no_grad():
        start = time.perf_counter()  # the first forward also reads the memory-mapped weights in: timed apart
        model(**inputs)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        features = model.get_image_features(pixel_values=inputs["pixel_values"].to(torch.bfloat16))
        features_s = time.perf_counter() - start
        start = time.perf_counter()
        logits = model(**inputs).logits[0, -1].float()
        first_token_s = time.perf_counter() - start
        start = time.perf_counter()
        generated = model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1]:].tolist()
        generate_s = time.perf_counter() - start
        other = dict(inputs, pixel_values=processor.image_processor(Image.new("RGB", (64, 64), "black"),
                                                                    return_tensors="pt")["pixel_values"])
        other_logits = model(**other).logits[0, -1].float()
    answer = pipeline("image-text-to-text", model=model, processor=processor)(
        text=chat(), return_full_text=False, generate_kwargs=settings)[0]["generated_text"]
    text = processor.decode(generated, skip_special_tokens=True)
    vlm, llm = [], []
    plain = bare_llm(model)
    words = torch.tensor([processor.tokenizer(QUESTION * 8, add_special_tokens=False)["input_ids"][:64]])
    text_only = {"input_ids": words, "attention_mask": torch.ones_like(words)}
    for _ in range(rounds):  # interleaved, so both see the same machine state
        vlm += decode_seconds(model, text_only, 3)
        llm += decode_seconds(plain, text_only, 3)
    ratios = [a / b for a, b in zip(vlm, llm)]
    del features
    return {"load_s": load_s, "cold_first_token_s": cold_s, "prompt_tokens": inputs["input_ids"].shape[1],
            "image_features_s": features_s,
            "prefill_s": first_token_s - features_s, "first_token_s": first_token_s, "generate_s": generate_s,
            "tokens": generated, "prompt_ids": inputs["input_ids"][0].tolist(), "text": text,
            "pipeline_text": answer, "image_changes_logits": float((logits - other_logits).abs().max()),
            "decode_s": spread(vlm), "bare_llm_decode_s": spread(llm), "decode_ratio": spread(ratios),
            "parameters": sum(p.numel() for p in model.parameters())}


def step_offload(folder: str, max_memory: str, offload: str, tokens: int) -> dict[str, Any]:
    """Load with device_map="auto" under a `max_memory` CPU limit that sends the rest to disk, and generate greedily."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": max_memory},
        offload_folder=offload).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    load_s = time.perf_counter() - start
    placed = {}
    for device in model.hf_device_map.values():
        placed[str(device)] = placed.get(str(device), 0) + 1
    inputs = processor.apply_chat_template(chat(), add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad():
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens)
    return {"load_s": load_s, "generate_s": time.perf_counter() - start, "device_map": placed,
            "new_tokens": generated.shape[1] - inputs["input_ids"].shape[1], "prompt_tokens": inputs["input_ids"].shape[1]}


def step_rope(folder: str, length: int) -> dict[str, Any]:
    """The converted LLM's rope settings as this transformers version loads them, and the model's logits past the
    original context against the plain causal LM of the converted text weights (and against that LLM without its
    rope scaling, which must differ there)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from cli_common import register_model_package

    register_model_package()
    from florence_vl.compatibility_florence_vl import rope_settings

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    text = config.text_config
    rope = rope_settings(text)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    weights = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            if name.startswith("model.language_model."):
                weights["model." + name[len("model.language_model."):]] = tensor.float()
            elif name.startswith("lm_head."):
                weights[name] = tensor.float()
    ids = torch.randint(10, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    logits = {}
    with torch.no_grad():
        logits["model"] = model(input_ids=ids).logits[0, -8:]
        for name, scaling in (("llm", True), ("llm_without_scaling", False)):
            llm_config = AutoConfig.for_model(**text.to_dict())
            if not scaling:
                llm_config = AutoConfig.for_model(**{**text.to_dict(), "rope_scaling": None, "rope_parameters": {
                    "rope_type": "default", "rope_theta": rope["rope_theta"]}})
            llm = AutoModelForCausalLM.from_config(llm_config, dtype=torch.float32).eval()
            missing, unexpected = llm.load_state_dict(weights, strict=False)
            assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
            logits[name] = llm(input_ids=ids).logits[0, -8:]
    return {"rope": {k: v for k, v in rope.items() if not isinstance(v, list)},
            "rope_lists": {k: len(v) for k, v in rope.items() if isinstance(v, list)},
            "rope_json": json.dumps(rope, sort_keys=True), "length": length,
            "model_vs_llm": float((logits["model"] - logits["llm"]).abs().max()),
            "llm_vs_unscaled": float((logits["llm"] - logits["llm_without_scaling"]).abs().max())}


def step_serve(folder: str, log: str, tokens: int) -> dict[str, Any]:
    """vLLM's OpenAI server (CPU build, Transformers backend, bfloat16) on the folder: one image chat, greedy."""
    import base64
    import socket
    import urllib.request

    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", str(port),
               "--host", "127.0.0.1", "--trust-remote-code", "--model-impl", "transformers", "--dtype", "bfloat16",
               "--max-model-len", "2048", "--enforce-eager", "--seed", "0"]
    start = time.perf_counter()
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    tree = TreePeak(server.pid)  # the server and its engine process (which no wait4 here reaps)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"error: the vLLM server exited with {server.returncode}: "
                                 + Path(log).read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(2)
        up_s = time.perf_counter() - start
        image = base64.b64encode((ROOT / "assets" / "example.png").read_bytes()).decode()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=1800, max_retries=0)
        start = time.perf_counter()
        response = client.chat.completions.create(
            model=folder, temperature=0.0, max_tokens=tokens, extra_body={"return_token_ids": True, "min_tokens": tokens},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                                                   {"type": "text", "text": QUESTION}]}])
        return {"server_up_s": up_s, "request_s": time.perf_counter() - start, "server_rss": tree.stop(),
                "tokens": response.choices[0].token_ids, "prompt_ids": response.prompt_token_ids}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


class TreePeak:
    """Samples, twice a second, the summed RSS of every process in the session `leader` started; `stop` gives the peak
    (bytes)."""

    def __init__(self, leader: int) -> None:
        self.leader, self.peak = leader, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            total = 0
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                    if int(fields[3]) == self.leader:  # the session id
                        total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # resident pages
                except (OSError, IndexError, ValueError):
                    continue
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        """Stop sampling; the peak."""
        self._stop.set()
        self._thread.join()
        return self.peak


STEPS = {"write": step_write, "generate": step_generate, "offload": step_offload, "rope": step_rope,
         "serve": step_serve}


# --------------------------------------------------------------------------------------------------- the orchestrator
class DiskPeak:
    """Samples the disk's used bytes every second; `peak` is the most above the start."""

    def __init__(self, path: Path) -> None:
        self.path, self.start, self.peak = path, shutil.disk_usage(path).used, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def sample(self) -> None:
        """Record the current use."""
        self.peak = max(self.peak, shutil.disk_usage(self.path).used - self.start)

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


def run_measured(command: list[str]) -> dict[str, Any]:
    """Run `command` from the repository root; its output, exit status, seconds and peak RSS (os.wait4: this launcher
    imports no torch, so the fork the child starts from is small)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)
    reader.start()
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    reader.join()
    return {"stdout": stdout, "stderr": errors[0], "returncode": os.waitstatus_to_exitcode(status),
            "seconds": time.perf_counter() - start, "rss": usage.ru_maxrss * 1024}


def run_step(python: str, name: str, *args: Any) -> dict[str, Any]:
    """Run one step of this file in a fresh `python` process; its result, seconds and peak RSS."""
    run = run_measured([python, str(Path(__file__)), "--step", name, *map(str, args)])
    lines = [line for line in run["stdout"].splitlines() if line.startswith(RESULT)]
    if run["returncode"] != 0 or not lines:
        raise SystemExit(f"error: step {name} exited with {run['returncode']}:\n{run['stderr'][-3000:]}")
    return {**json.loads(lines[-1][len(RESULT):]), "seconds": run["seconds"], "rss": run["rss"]}


def converter(src: Path, out: Path, *extra: str) -> list[str]:
    """The converter's command line as docs/conversion.md gives it."""
    return [sys.executable, str(ROOT / "convert_checkpoint.py"), str(src), str(out), *extra]


def timed_converter(python: str, src: Path, out: Path, *extra: str) -> dict[str, Any]:
    """Run the converter to the end; its seconds include syncing its writes to disk (as the plain copy's do)."""
    start = time.perf_counter()
    run = run_measured([python, *converter(src, out, *extra)[1:]])
    os.sync()
    return {**run, "seconds": time.perf_counter() - start}


def staging(out: Path) -> list[Path]:
    """The converter's staging folders for OUT."""
    return sorted(out.parent.glob(f".{out.name}.*.partial"))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def kill_mid_run(python: str, src: Path, out: Path, sig: int, size: str) -> None:
    """Start a conversion, send `sig` once its staging folder holds a quarter of the weights (tiny: any), and check
    what is left: SIGTERM: nothing (staging removed, OUT absent, one error line); SIGKILL: no OUT, the staging folder
    (which the next conversion to OUT removes)."""
    target = folder_bytes(src) // 4 if size == "real" else 1
    for _ in range(5):  # a tiny conversion may finish between two looks: then again
        process = subprocess.Popen([python, *converter(src, out)[1:]], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, cwd=ROOT)
        sent = False
        while process.poll() is None and not sent:
            folders = staging(out)
            if folders and folder_bytes(folders[0]) >= target:
                process.send_signal(sig)
                sent = True
            time.sleep(0.005)
        err = process.communicate()[1]
        if sent:
            break
        if process.returncode != 0:
            raise SystemExit(f"error: the conversion failed before it could be killed: {err[-2000:]}")
        shutil.rmtree(out)
    else:
        raise SystemExit("error: the conversion finished each time before it could be killed")
    check(not out.exists(), f"killed by signal {sig}: no {out.name}")
    if sig == signal.SIGTERM:
        check(process.returncode == 130 and not staging(out), "SIGTERM: exit 130, staging folder removed")
        lines = err.strip().splitlines()
        check(len(lines) == 1 and lines[0].startswith("error: interrupted"), f"SIGTERM: one error line ({lines[-1:]})")
    else:
        check(len(staging(out)) == 1, "SIGKILL: its staging folder is left (no handler runs), hidden beside OUT")


FAILURES: list[str] = []


def check(condition: bool, what: str) -> None:
    """Print a check's outcome; a failed one makes the run fail at the end."""
    print(f"  [{'ok' if condition else 'FAIL'}] {what}", flush=True)
    if not condition:
        FAILURES.append(what)


def check_output(out: Path, max_bytes: int) -> None:
    """The converted folder: shards within --max-shard-size (a bigger single tensor aside), index complete."""
    from_index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(from_index["weight_map"].values()))
    check(sorted(p.name for p in out.glob("*.safetensors")) == files, "index names every shard, every shard indexed")
    from convert_checkpoint import read_safetensors_header

    total = 0
    for file in files:
        header = read_safetensors_header(out / file)  # checks too that the file holds every byte it announces
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
        tensors = list(header)
        check((out / file).stat().st_size <= max_bytes or len(tensors) == 1, f"{file} within --max-shard-size")
        check(all(from_index["weight_map"][k] == file for k in tensors), f"{file}'s tensors indexed to it")
    check(total == from_index["metadata"]["total_size"], "index total_size = the shards' bytes")


def plain_copy_seconds(src: Path, scratch: Path) -> float:
    """Seconds to copy the release's files to the same disk (the converter's floor: it reads and writes every byte)."""
    start = time.perf_counter()
    shutil.copytree(src, scratch)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return seconds


def parse_bytes(text: str) -> int:
    """Bytes in a max_memory value such as 6GiB or 20MB."""
    units = {"GIB": GIB, "MIB": 1024 ** 2, "GB": 10 ** 9, "MB": 10 ** 6}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def gib(count: float) -> str:
    """Bytes in GiB."""
    return f"{count / GIB:.2f} GiB"


def convert_release(key: str, work: Path, python: str, figures: dict[str, Any], size: str) -> Path:
    """Write, time a plain copy of, kill and convert one release; its converted folder."""
    src, out = work / f"{key}-release", work / f"{key}-converted"
    print(f"== {NAMES[key]} ({size} size): writing the release", flush=True)
    written = run_step(python, "write", key, size, src)
    print(f"  {written['shards']} shards, {gib(written['bytes'])}, largest {gib(written['largest_shard'])}, "
          f"written in {written['seconds']:.0f} s")
    copy_s = plain_copy_seconds(src, work / f"{key}-copy")
    print(f"== converting (a plain copy of the same files: {copy_s:.1f} s)", flush=True)
    if key == "8b":  # the bigger one: killed well inside its weights
        kill_mid_run(python, src, out, signal.SIGTERM, size)
        kill_mid_run(python, src, out, signal.SIGKILL, size)
    limit = SHARD_BYTES if size == "real" else 10 ** 7  # tiny: still several shards
    result = timed_converter(python, src, out, "--max-shard-size", str(limit))
    if result["returncode"] != 0:
        raise SystemExit(f"error: converting {key}: {result['stderr'][-3000:]}")
    if key == "8b":
        check("left by a conversion" in result["stdout"] and not staging(out),
              "the next conversion to OUT removed the killed one's staging folder")
    rule = [line for line in result["stdout"].splitlines() if line.startswith("Prompt rule")]
    print("  " + (rule[0] if rule else "(no prompt rule printed)"))
    check(result["rss"] <= written["largest_shard"] + 2 * GIB,
          f"converter peak RSS {gib(result['rss'])} <= largest input shard + 2 GiB")
    ratio = result["seconds"] / copy_s
    check(ratio <= 2.0 or size == "tiny",
          f"convert {result['seconds']:.1f} s = x{ratio:.2f} a plain copy (<= x2.0 at real size)")
    check_output(out, limit)
    figures[key] = {"release_bytes": written["bytes"], "shards": written["shards"],
                    "largest_shard": written["largest_shard"], "convert_s": result["seconds"],
                    "convert_rss": result["rss"], "copy_s": copy_s, "convert_vs_copy": ratio}
    if key == "8b":  # the same release with the tower taken from its own folder instead of the shards
        other = work / "8b-converted-tower-folder"
        again = timed_converter(python, src, other, "--vision-tower", str(src / "vision_tower"), "--max-shard-size",
                                str(limit))
        check(again["returncode"] == 0 and "replaced by --vision-tower" in again["stdout"],
              "8B with --vision-tower (the tower as its own folder) converts")
        check(read_index(out) == read_index(other) and same_tower(out, other),
              "... to the same tensors in the same shards, the tower's values equal")
        shutil.rmtree(other)
        figures[key]["convert_tower_folder_s"] = again["seconds"]
    shutil.rmtree(src)
    return out


def same_tower(first: Path, second: Path) -> bool:
    """Whether two converted folders hold equal values for every tensor outside the LLM (the tower, the projector)."""
    from safetensors import safe_open

    index = read_index(first)
    for name, file in index.items():
        if not name.startswith(("model.language_model.", "lm_head.")):
            with safe_open(str(first / file), "pt") as a, safe_open(str(second / file), "pt") as b:
                if not a.get_tensor(name).equal(b.get_tensor(name)):
                    return False
    return True


def read_index(out: Path) -> dict[str, str]:
    """A converted folder's weight map."""
    return json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


def main(argv: Optional[list[str]] = None) -> int:
    """Run every step and print the figures; exit 1 when a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--work", help="folder to write in (default: a new temporary folder; removed at the end)")
    parser.add_argument("--other-python", help="the other transformers version's python, for the rope check")
    parser.add_argument("--vllm-python", help="the vLLM virtualenv's python, to serve the converted 3B")
    parser.add_argument("--offload-max-memory", default="6GiB",
                        help="the CPU max_memory for the 8B offload run (real size; tiny: 20MB)")
    parser.add_argument("--releases", default="3b,8b", help="which releases to write, convert and run (the rope "
                                                                 "check always covers both)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--step", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        values = [int(a) if a.isdigit() else a for a in args.step[1:]]  # counts come as text on the command line
        print(RESULT + json.dumps(STEPS[args.step[0]](*values)), flush=True)
        return 0
    if not MANIFESTS.is_file():
        print(f"error: {MANIFESTS} is missing", file=sys.stderr)
        return 1
    work = Path(args.work or tempfile.mkdtemp(prefix="florence_vl_real_size."))
    work.mkdir(parents=True, exist_ok=True)
    disk = DiskPeak(work)
    figures: dict[str, Any] = {"size": args.size}
    tokens, rounds = (3, 2) if args.size == "real" else (4, 3)
    try:
        python = sys.executable
        for key in args.releases.split(","):
            out = convert_release(key, work, python, figures, args.size)
            print(f"== {key}: load and generate" + (" (offloaded)" if key == "8b" else ""), flush=True)
            if key == "3b":
                run = run_step(python, "generate", out, tokens, rounds)
                figures[key].update(run)
                check(run["text"] == run["pipeline_text"], "first greedy tokens = the pipeline's for the same chat")
                check(run["image_changes_logits"] > 0, "another image changes the logits "
                      f"(max diff {run['image_changes_logits']:.3g})")
                print(f"  load {run['load_s']:.1f} s (weights memory-mapped), first answer token "
                      f"{run['cold_first_token_s']:.1f} s (reads them in), peak RSS {gib(run['rss'])}; then, "
                      f"{run['prompt_tokens']} prompt tokens: image features {run['image_features_s']:.1f} s + prefill "
                      f"{run['prefill_s']:.1f} s; decode {run['decode_s']['median']:.3f} s/token = "
                      f"x{run['decode_ratio']['median']:.2f} the bare LLM "
                      f"(x{run['decode_ratio']['min']:.2f}-x{run['decode_ratio']['max']:.2f})")
                weights = folder_bytes(out)
                check(run["rss"] <= weights + 2 * GIB, f"peak RSS {gib(run['rss'])} <= weights "
                      f"({gib(weights)}) + 2 GiB")
                if args.vllm_python:
                    served = run_step(args.vllm_python, "serve", out, work / "vllm.log", tokens)
                    figures["serve_3b"] = served
                    check(served["prompt_ids"] == run["prompt_ids"], "vLLM's prompt ids = transformers'")
                    check(served["tokens"][:2] == run["tokens"][:2],
                          f"vLLM's first greedy tokens = transformers' ({served['tokens']} vs {run['tokens']})")
                    print(f"  vLLM server up in {served['server_up_s']:.0f} s, one request {served['request_s']:.1f} s, "
                          f"peak RSS of its processes {gib(served['server_rss'])}")
            else:
                limit = args.offload_max_memory if args.size == "real" else "20MB"
                run = run_step(python, "offload", out, limit, work / "offload", tokens)
                figures[key].update(run, max_memory=limit)
                check("disk" in run["device_map"], f"max_memory cpu={limit} puts part of it on disk "
                      f"({run['device_map']})")
                check(run["new_tokens"] == tokens, f"{tokens} greedy tokens generated")
                budget = parse_bytes(limit)
                check(run["rss"] <= budget + 2 * GIB or args.size == "tiny",
                      f"peak RSS {gib(run['rss'])} <= max_memory ({gib(budget)}) + 2 GiB")
                print(f"  load {run['load_s']:.1f} s, {tokens} tokens in {run['generate_s']:.1f} s, "
                      f"peak RSS {gib(run['rss'])}")
            shutil.rmtree(out)
            shutil.rmtree(work / "offload", ignore_errors=True)
        rope_checks(work, python, args.other_python, figures)
    finally:
        peak = disk.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    figures["peak_disk"] = peak
    print(f"== peak disk use {gib(peak)}; work folder removed")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if FAILURES:
        print(f"error: {len(FAILURES)} check(s) failed: {'; '.join(FAILURES)}", file=sys.stderr)
        return 1
    return 0


ROPE_LENGTHS = {"8b": 8192 + 512, "3b": 4096 + 512}  # past each release's original context (8192, 4096)


def rope_checks(work: Path, python: str, other: Optional[str], figures: dict[str, Any]) -> None:
    """Shrunken releases with the real rope settings: converted here, loaded under this version and the other, their
    logits past the original context equal the plain LLM's."""
    for key in ("8b", "3b"):
        print(f"== {NAMES[key]}: rope settings on a shrunken model, {ROPE_LENGTHS[key]} tokens", flush=True)
        src, out = work / f"{key}-rope-release", work / f"{key}-rope-converted"
        run_step(python, "write", key, "tiny", src)
        converted = timed_converter(python, src, out)
        if converted["returncode"]:
            raise SystemExit(f"error: converting {src}: {converted['stderr'][-2000:]}")
        results = {"here": run_step(python, "rope", out, ROPE_LENGTHS[key])}
        if other:
            results["other"] = run_step(other, "rope", out, ROPE_LENGTHS[key])
        for where, result in results.items():
            check(result["model_vs_llm"] <= 1e-4, f"{where}: logits at {result['length']} = the plain LLM's "
                  f"(max diff {result['model_vs_llm']:.2g})")
            check(result["llm_vs_unscaled"] > 1e-3, f"{where}: ... and differ without the rope scaling "
                  f"({result['llm_vs_unscaled']:.2g}): the setting is in effect")
        if other:
            check(results["here"]["rope_json"] == results["other"]["rope_json"],
                  "both transformers versions load the same rope settings")
        print(f"  rope as loaded: {results['here']['rope']} {results['here']['rope_lists']}")
        figures[f"rope_{key}"] = {k: {x: y for x, y in v.items() if x != "rope_json"} for k, v in results.items()}
        shutil.rmtree(src)
        shutil.rmtree(out)


if __name__ == "__main__":
    sys.exit(main())
