"""Florence-VL inference benchmark: time to first token by stage, decode speed, peak memory, and measured ratios.

    python benchmarks/benchmark.py --sizes tiny,base --batches 1,4 [--ratios breadth,static,load,convert]

Random weights (no download). Sizes: "tiny" (the tests' dimensions), "base" (Florence-2-base tower and encoder with a
0.5B Llama-style LLM), "mid" (base with an 8-layer LLM), "3b"/"8b" (the real release shapes, bf16; CUDA only). Every
ratio is measured side by side in one process, interleaved and repeated; the median is reported. Decode, time to first
token and image features against their parts: benchmarks/overhead.py. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLORENCE_VL_SHARED", ROOT.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))
from cli_common import register_model_package  # noqa: E402

register_model_package()

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList  # noqa: E402

from florence_vl.configuration_florence_vl import (  # noqa: E402
    LLAMA31_8B_TEXT,
    RELEASE_IMAGE_TOKEN_IDS,
    FlorenceVLConfig,
)
from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration  # noqa: E402

IMAGE_TOKENS = 577
TEXT_BEFORE, TEXT_AFTER = 40, 24  # text tokens around the image in every benchmark prompt

# Sizes. "tiny" repeats tests/conftest.py's TINY_* dimensions (tests/test_fast_paths.py checks they agree).
TINY = dict(
    vision=dict(depths=[1, 1, 2, 1], embed_dim=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], num_groups=[1, 2, 3, 4],
                projection_dim=32, drop_path_rate=0.0),
    encoder=dict(vocab_size=51289, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                 decoder_layers=0, max_position_embeddings=1024, pad_token_id=1),
    text=dict(model_type="llama", vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=0,
              eos_token_id=4, pad_token_id=7),
)
BASE = dict(
    # Florence-2-base: DaViT 128/256/512/1024, depths 1/1/9/1, projection 768; BART encoder 768 x 6 layers.
    vision=dict(depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32],
                num_groups=[4, 8, 16, 32], window_size=12, projection_dim=768, drop_path_rate=0.0),
    encoder=dict(vocab_size=51289, d_model=768, encoder_layers=6, encoder_attention_heads=12, encoder_ffn_dim=3072,
                 decoder_layers=0, max_position_embeddings=1024, scale_embedding=False, pad_token_id=1,
                 bos_token_id=0, eos_token_id=2),
    # A 0.49B Llama-style LLM (the Qwen2.5-0.5B shape: GQA 14/2, tied embeddings).
    text=dict(model_type="llama", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, pad_token_id=1),
)
# "mid": the base size with an 8-layer LLM (0.26B), where the LLM and the image side cost about the same on a CPU.
MID = dict(BASE, text=dict(BASE["text"], num_hidden_layers=8))
REAL_TEXT = {
    "8b": dict(LLAMA31_8B_TEXT),  # the config default: the 8B release's Llama-3.1
    "3b": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
               original_max_position_embeddings=4096, rope_theta=10000.0,
               rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.5] * 48},
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
}
SIZES = ("tiny", "mid", "base", "3b", "8b")
RATIOS = ("breadth", "static", "load", "convert")  # decode and TTFT against their parts: benchmarks/overhead.py


def build_config(size: str) -> FlorenceVLConfig:
    """The Florence-VL config of a benchmark size (3b/8b: the Florence-2-large tower of the releases)."""
    if size in REAL_TEXT:
        text = dict(REAL_TEXT[size])
        return FlorenceVLConfig(text_config=text, image_token_id=RELEASE_IMAGE_TOKEN_IDS[text["model_type"]])
    dims = {"tiny": TINY, "mid": MID, "base": BASE}[size]
    return FlorenceVLConfig(vision_config=dict(dims["vision"]), breadth_encoder_config=dict(dims["encoder"]),
                            text_config=dict(dims["text"]), image_token_id=5)  # any id inside the table


def build_model(size: str, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> FlorenceVLForConditionalGeneration:
    """A random-weight Florence-VL model of `size`, in eval mode on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = FlorenceVLForConditionalGeneration(build_config(size))
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    return model


def bare_llm(model: FlorenceVLForConditionalGeneration) -> torch.nn.Module:
    """The same LLM weights as a plain `AutoModelForCausalLM` (what a text-only user would run)."""
    with torch.device(model.device):
        llm = AutoModelForCausalLM.from_config(model.config.text_config)
    llm.model.load_state_dict(model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    llm.generation_config.pad_token_id = model.config.text_config.pad_token_id
    return llm.to(model.dtype).eval()


def sample_inputs(model, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`batch` prompts of [text ; 577 image placeholders ; text] and their random pixel values."""
    generator = torch.Generator().manual_seed(seed)
    vocab = min(model.config.text_config.vocab_size, 30000)
    image_token = model.config.image_token_id
    text = torch.randint(9, vocab, (batch, TEXT_BEFORE + TEXT_AFTER), generator=generator)
    text = text.masked_fill(text == image_token, 9)  # no stray placeholder among the text
    image = torch.full((batch, IMAGE_TOKENS), image_token)
    input_ids = torch.cat([text[:, :TEXT_BEFORE], image, text[:, TEXT_BEFORE:]], dim=1)
    pixels = torch.randn(batch, 3, 768, 768, generator=generator)
    return {"input_ids": input_ids.to(model.device), "attention_mask": torch.ones_like(input_ids).to(model.device),
            "pixel_values": pixels.to(model.device, model.dtype)}


# ------------------------------------------------------------------------------------------------------ measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds `fn` takes (device work included), and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator peak, or the process's VmHWM via /proc/self/clear_refs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory(device: torch.device) -> float:
    """Peak bytes since `reset_peak_memory`: CUDA max allocated, or the process's peak RSS."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StepClock(StoppingCriteria):
    """Records a timestamp after every `generate` step (never stops generation)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_step_times(model, inputs: dict, new_tokens: int, **options) -> tuple[float, list[float]]:
    """`generate` greedily for `new_tokens`: (prefill + first token seconds, seconds of each later step)."""
    clock = StepClock(model.device)
    synchronize(model.device)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   stopping_criteria=StoppingCriteriaList([clock]), **options)
    stamps = [start, *clock.times]
    return stamps[1] - stamps[0], [b - a for a, b in zip(stamps[1:], stamps[2:])]


def median(values: list[float]) -> float:
    return statistics.median(values)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds < 10 else f"{seconds * 1000:.0f}"


def fmt_bytes(count: float) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


# -------------------------------------------------------------------------------------------------- stage table
@torch.no_grad()
def stage_times(model, inputs: dict) -> dict[str, float]:
    """Time to first token split into depth, breadth, fusion + projector and LLM prefill (with its LM head)."""
    device, inner = model.device, model.model
    t_depth, depth = timed(lambda: inner.get_depth_features(inputs["pixel_values"]).pooler_output, device)
    t_breadth, breadth = timed(lambda: inner.get_breadth_features(depth), device)

    t_fusion, image_features = timed(lambda: inner.dbfusion_projector(inner.fuse_features(depth, breadth)), device)

    def prefill() -> torch.Tensor:
        """The model's own splice (get_placeholder_mask) and forward, given the image features."""
        ids = inputs["input_ids"]
        embeds = inner.get_input_embeddings()(ids)
        features = image_features.to(embeds.dtype)
        embeds = embeds.masked_scatter(inner.get_placeholder_mask(ids, embeds, features), features)
        output = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=True, logits_to_keep=1)
        return output.logits.argmax(-1)

    t_prefill, _ = timed(prefill, device)
    return {"depth": t_depth, "breadth": t_breadth, "fusion": t_fusion, "prefill": t_prefill}


def table_rows(size: str, batches: list[int], device: torch.device, dtype: torch.dtype, repeats: int,
               new_tokens: int) -> list[dict]:
    """One row per batch size: stage times (median of `repeats`), decode speed and peak memory."""
    model = build_model(size, device, dtype)
    rows = []
    for batch in batches:
        inputs = sample_inputs(model, batch)
        with torch.no_grad():
            stage_times(model, sample_inputs(model, 1))  # warm-up (allocator, kernels)
        reset_peak_memory(device)
        stages = [stage_times(model, inputs) for _ in range(repeats)]
        stage = {k: median([s[k] for s in stages]) for k in stages[0]}
        ttft, steps = decode_step_times(model, inputs, new_tokens)
        peak = peak_memory(device)
        step = median(steps)
        rows.append({"size": size, "batch": batch, **stage, "ttft": sum(stage.values()), "generate_ttft": ttft,
                     "step": step, "tok_s": 1.0 / step, "tok_s_total": batch / step, "peak": peak})
        print(f"  measured {size} batch {batch}", file=sys.stderr, flush=True)
    del model
    gc.collect()
    return rows


def print_table(rows: list[dict], device: torch.device) -> None:
    memory = "peak CUDA allocated" if device.type == "cuda" else "peak RSS"
    print("| size | batch | depth ms | breadth ms | fusion+proj ms | LLM prefill ms | TTFT ms | decode ms/step "
          f"| tok/s per seq | tok/s total | {memory} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['size']} | {r['batch']} | {fmt_ms(r['depth'])} | {fmt_ms(r['breadth'])} | {fmt_ms(r['fusion'])} "
              f"| {fmt_ms(r['prefill'])} | {fmt_ms(r['ttft'])} | {fmt_ms(r['step'])} | {r['tok_s']:.1f} "
              f"| {r['tok_s_total']:.1f} | {fmt_bytes(r['peak'])} |")


# --------------------------------------------------------------------------------------------------------- ratios
def breadth_loop(model, depth: torch.Tensor) -> dict[str, torch.Tensor]:
    """The straightforward path: one encoder pass per image and per prompt, [V ; prompt] each time."""
    inner, config = model.model, model.config
    pad = config.breadth_encoder_config.pad_token_id
    out: dict[str, list[torch.Tensor]] = {task: [] for task in config.breadth_prompts}
    for image in depth:
        for task in config.breadth_prompts:
            ids = torch.tensor([config.florence_prompts[task]["input_ids"]], device=depth.device)
            embeds = torch.cat([image[None], inner.breadth_encoder.embed_tokens(ids).to(depth.dtype)], dim=1)
            mask = None
            if not config.attend_prompt_padding:
                mask = torch.cat([torch.ones(1, image.shape[0], dtype=torch.long, device=ids.device),
                                  (ids != pad).long()], dim=1)
            hidden = inner.breadth_encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            out[task].append(hidden[:, : image.shape[0]])
    return {task: torch.cat(parts) for task, parts in out.items()}


def encoder_flops(model, sequences: int) -> float:
    """Multiply-add FLOPs of one breadth encoder pass over `sequences` x [V ; prompt] (projections, FFN, attention)."""
    config = model.config
    enc = config.breadth_encoder_config
    length = config.image_seq_length + max(len(p["input_ids"]) for p in config.florence_prompts.values())
    d, ffn = enc.d_model, enc.encoder_ffn_dim
    per_layer = 2 * length * d * d * 4 + 2 * length * d * ffn * 2 + 2 * 2 * length * length * d
    return float(sequences * enc.encoder_layers * per_layer)


@torch.no_grad()
def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of a large square matrix product on this device and dtype: what compute-bound code can reach."""
    n = 4096 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timed(lambda: a @ b, device)
    return 2 * n**3 / min(timed(lambda: a @ b, device)[0] for _ in range(repeats))


@torch.no_grad()
def ratio_breadth(model, batch: int, repeats: int) -> dict:
    """Batched breadth pass vs the per-image, per-prompt loop, interleaved on the same weights and inputs."""
    device = model.device
    depth = model.model.get_depth_features(sample_inputs(model, batch)["pixel_values"]).pooler_output
    batched_out, loop_out = model.model.get_breadth_features(depth), breadth_loop(model, depth)  # also warm-up
    error = max(float((batched_out[t] - loop_out[t]).abs().max()) for t in batched_out)
    batched, loop = [], []
    for _ in range(repeats):
        batched.append(timed(lambda: model.model.get_breadth_features(depth), device)[0])
        loop.append(timed(lambda: breadth_loop(model, depth), device)[0])
    ratio = median([a / b for a, b in zip(loop, batched)])  # paired: neighbours in time share the machine's load
    # Both paths do the same FLOPs, so batching can at best lift the loop's rate to the matmul peak.
    flops, peak = encoder_flops(model, batch * len(model.config.breadth_prompts)), matmul_peak(device, depth.dtype)
    return {"batched": median(batched), "loop": median(loop), "ratio": ratio, "flops": flops, "peak_flops": peak,
            "batched_flops": flops / median(batched), "loop_flops": flops / median(loop),
            "ceiling": peak * median(loop) / flops, "max_abs_diff": error, "runs": repeats, "batch": batch}


@torch.no_grad()
def copy_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Bytes/s of a large on-device copy (read + write): the memory bandwidth a decode step can use."""
    source = torch.empty(2**28, dtype=torch.float32, device=device).fill_(1.0)  # 1 GiB
    target = torch.empty_like(source)
    timed(lambda: target.copy_(source), device)
    return 2 * source.nbytes / min(timed(lambda: target.copy_(source), device)[0] for _ in range(repeats))


def decode_bytes_per_token(model, cache_length: int) -> float:
    """Bytes one batch-1 decode step must read: the LLM's weights (but one embedding row) and the KV cache."""
    llm, text = model.model.language_model, model.config.text_config
    weights = {id(p): p.nbytes for p in [*llm.parameters(), *model.lm_head.parameters()]}  # tied ones once
    embedding = llm.get_input_embeddings().weight
    if embedding is not model.lm_head.weight:  # untied: a step reads only the looked-up row
        weights.pop(id(embedding))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * cache_length * embedding.element_size()
    return float(sum(weights.values()) + kv)


@torch.no_grad()
def ratio_static(model, repeats: int, new_tokens: int, backend: str) -> dict:
    """Batch-1 greedy decode with a static cache and torch.compile vs the dynamic cache, against the bandwidth bound.

    The first compiled `generate` compiles (not timed); tokens of both paths must agree. The bound is the measured
    copy bandwidth divided by the bytes a step reads: no batch-1 decode step can be faster.
    """
    from transformers import CompileConfig

    inputs = sample_inputs(model, 1)
    compile_config = CompileConfig(backend=backend)
    compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told otherwise
    static = {"cache_implementation": "static", "compile_config": compile_config}
    start = time.perf_counter()
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    compiled_tokens = model.generate(**inputs, **static, **options)
    compile_seconds = time.perf_counter() - start
    dynamic_tokens = model.generate(**inputs, **options)
    dynamic, compiled = [], []
    for _ in range(repeats):
        dynamic.append(median(decode_step_times(model, inputs, new_tokens)[1]))
        compiled.append(median(decode_step_times(model, inputs, new_tokens, **static)[1]))
    length = inputs["input_ids"].shape[1] + new_tokens // 2
    bytes_per_token, bandwidth = decode_bytes_per_token(model, length), copy_bandwidth(model.device)
    bound = bandwidth / bytes_per_token
    return {"dynamic_tok_s": 1 / median(dynamic), "static_tok_s": 1 / median(compiled), "bound_tok_s": bound,
            "fraction_of_bound": 1 / median(compiled) / bound, "bytes_per_token": bytes_per_token,
            "bandwidth": bandwidth, "same_tokens": bool(torch.equal(compiled_tokens, dynamic_tokens)),
            "compile_seconds": compile_seconds, "backend": backend, "runs": repeats}


def native_florence2_config(config: FlorenceVLConfig) -> "transformers.Florence2Config":
    """transformers' native Florence-2 config with our tower and breadth encoder, and a decoder as deep as the encoder
    (Florence-2 has one; Florence-VL does not use it)."""
    from transformers import BartConfig, Florence2Config

    encoder = config.breadth_encoder_config.to_dict()
    encoder.pop("model_type", None)
    encoder.update(decoder_layers=encoder["encoder_layers"], decoder_attention_heads=encoder["encoder_attention_heads"],
                   decoder_ffn_dim=encoder["encoder_ffn_dim"])
    return Florence2Config(vision_config=config.vision_config.to_dict(), text_config=BartConfig(**encoder))


def ratio_load(model, workdir: Path, repeats: int) -> dict:
    """from_pretrained of the saved Florence-VL folder vs its parts saved alone (the LLM + native Florence-2)."""
    from transformers import Florence2ForConditionalGeneration

    ours, llm_dir, florence_dir = workdir / "florence_vl", workdir / "llm", workdir / "florence2"
    model.save_pretrained(ours)
    bare_llm(model).save_pretrained(llm_dir)
    native = Florence2ForConditionalGeneration(native_florence2_config(model.config))
    native.to(model.dtype).save_pretrained(florence_dir)
    dtype = model.dtype
    loaders = {
        "ours": lambda: FlorenceVLForConditionalGeneration.from_pretrained(ours, dtype=dtype),
        "llm": lambda: AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype),
        "florence2": lambda: Florence2ForConditionalGeneration.from_pretrained(florence_dir, dtype=dtype),
    }
    times = {name: [] for name in loaders}
    for _ in range(repeats + 1):  # the first round warms the page cache and imports
        for name, load in loaders.items():
            gc.collect()
            start = time.perf_counter()
            loaded = load()
            times[name].append(time.perf_counter() - start)
            del loaded
    times = {name: median(values[1:]) for name, values in times.items()}
    parts = times["llm"] + times["florence2"]
    return {**times, "parts": parts, "ratio": times["ours"] / parts, "runs": repeats}


def synthetic_release(folder: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A 2-shard `llava_llama` release (bf16 LLM + projector) with the test fixture's tower folder and tokenizer."""
    from safetensors.torch import save_file

    fixture = SHARED / "fixtures" / "florence_vl_tiny_llama" / "original_checkpoint"
    if not fixture.is_dir():
        raise SystemExit(f"the converter ratio needs the test fixture at {fixture} (set FLORENCE_VL_SHARED)")
    folder.mkdir(parents=True)
    config = json.loads((fixture / "config.json").read_text())
    heads = hidden // 64
    config.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                  intermediate_size=hidden * 3, torch_dtype="bfloat16")
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    width = 4 * config["mm_hidden_size"]
    shards: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": rand(vocab, hidden),
         "model.mm_projector.encoder_mlp.0.weight": rand(hidden, width),
         "model.mm_projector.encoder_mlp.0.bias": rand(hidden)},
        {"model.norm.weight": rand(hidden), "lm_head.weight": rand(vocab, hidden)},
    ]
    for i in (1, 2):
        shards[1][f"model.mm_projector.encoder_mlp.{i}.1.weight"] = rand(hidden, hidden)
        shards[1][f"model.mm_projector.encoder_mlp.{i}.1.bias"] = rand(hidden)
    for layer in range(layers):
        p, inter = f"model.layers.{layer}.", hidden * 3
        shards[layer * 2 // layers].update({
            p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(hidden, hidden),
            p + "self_attn.v_proj.weight": rand(hidden, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": rand(hidden), p + "post_attention_layernorm.weight": rand(hidden)})
    weight_map = {}
    for number, tensors in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-00002.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    shards.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config["vocab_size"] = vocab
    (folder / "config.json").write_text(json.dumps(config))
    for file in ("generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture / file, folder / file)
    shutil.copytree(fixture / "vision_tower", folder / "vision_tower")
    return folder


# Runs the converter and prints its peak RSS. A fresh, small launcher is needed: Linux seeds a child's ru_maxrss with
# the RSS of the process it was forked from, so measuring straight from this (large) process would report our own size.
PEAK_RSS_LAUNCHER = (
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def ratio_convert(workdir: Path, hidden: int, layers: int, vocab: int) -> dict:
    """Peak RSS of `python convert_checkpoint.py SRC OUT` (default options) vs the largest source shard."""
    src = synthetic_release(workdir / "release", hidden, layers, vocab)
    largest = max(f.stat().st_size for f in src.glob("*.safetensors"))
    out = workdir / "converted"
    command = [sys.executable, "-c", PEAK_RSS_LAUNCHER, sys.executable, str(ROOT / "convert_checkpoint.py"), str(src),
               str(out)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"convert_checkpoint.py failed:\n{result.stderr[-2000:]}")
    peak = int(result.stdout.split()[-1]) * 1024
    shutil.rmtree(out)
    return {"largest_shard": largest, "peak_rss": peak, "excess": peak - largest, "seconds": seconds,
            "ok": peak <= largest + 500 * 2**20}


# ----------------------------------------------------------------------------------------------------------- main
def machine(device: torch.device) -> str:
    """CPU model, cores, threads, accelerator and library versions, in one line."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"CPU {cpu}", f"{os.cpu_count()} cores", f"torch threads {torch.get_num_threads()}"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts += [f"torch {torch.__version__}", f"transformers {transformers.__version__}",
              f"Python {platform.python_version()}"]
    return ", ".join(parts)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,base", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes of the table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is reported)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per decode measurement")
    parser.add_argument("--ratios", default="",
                        help=f"comma-separated from {','.join(RATIOS)} ('' = none)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the static ratio (the tests use 'eager' to stay fast)")
    parser.add_argument("--ratio-size", default="base", help="model size the breadth/static/load ratios use")
    parser.add_argument("--ratio-batch", type=int, default=4, help="batch of the breadth ratio")
    parser.add_argument("--convert-dims", default="2048,8,32000",
                        help="hidden,layers,vocab of the synthetic checkpoint the converter ratio converts")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", help="also write every number to this JSON file")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sizes = [s for s in args.sizes.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    ratios = [r for r in args.ratios.split(",") if r]
    unknown = [s for s in sizes + [args.ratio_size] if s not in SIZES] + [
        r for r in ratios if r not in RATIOS]
    if unknown:
        raise SystemExit(f"unknown size or ratio: {', '.join(unknown)}")
    real = sorted({s for s in sizes + ([args.ratio_size] if ratios else []) if s in REAL_TEXT})
    if real and device.type != "cuda":
        raise SystemExit(f"sizes {', '.join(real)} have the real 3B/8B shapes: run them on a CUDA GPU "
                         f"(on CPU a single prefill takes minutes and 16-32 GB of RAM); use --sizes tiny,base here")
    results: dict = {"machine": machine(device), "dtype": str(dtype).replace("torch.", ""), "rows": []}
    print(f"Machine: {results['machine']}; dtype {results['dtype']}; median of {args.repeats} runs\n")

    for size in sizes:
        results["rows"] += table_rows(size, batches, device, dtype, args.repeats, args.new_tokens)
    if results["rows"]:
        print_table(results["rows"], device)
        print("\nTTFT = depth + breadth + fusion+proj + LLM prefill (stage medians); decode = median `generate` step.")

    model = build_model(args.ratio_size, device, dtype) if set(ratios) - {"convert"} else None
    if "breadth" in ratios:
        r = ratio_breadth(model, args.ratio_batch, args.repeats)
        results["breadth"] = r
        print(f"\nBreadth ({args.ratio_size}, batch {r['batch']}, 3 prompts): batched pass {fmt_ms(r['batched'])} ms, "
              f"loop per image and prompt {fmt_ms(r['loop'])} ms -> {r['ratio']:.2f}x faster "
              f"(max |diff| {r['max_abs_diff']:.1e}; median of {r['runs']} paired runs)\n"
              f"  {r['flops'] / 1e9:.1f} GFLOP per pass: batched {r['batched_flops'] / 1e9:.0f} GFLOP/s, loop "
              f"{r['loop_flops'] / 1e9:.0f} GFLOP/s, matmul peak here {r['peak_flops'] / 1e9:.0f} GFLOP/s "
              f"-> no exact batching can beat the loop by more than {r['ceiling']:.2f}x on this machine")
    if "static" in ratios:
        r = ratio_static(model, args.repeats, args.new_tokens, args.compile_backend)
        results["static"] = r
        print(f"\nStatic cache + torch.compile ({args.ratio_size}, batch 1, backend {r['backend']}): "
              f"{r['static_tok_s']:.1f} tok/s vs dynamic cache {r['dynamic_tok_s']:.1f} tok/s; same tokens: "
              f"{'yes' if r['same_tokens'] else 'NO'}; first call {r['compile_seconds']:.0f} s (compiling)\n"
              f"  a step reads {fmt_bytes(r['bytes_per_token'])} (LLM weights + KV cache) at a measured copy "
              f"bandwidth of {r['bandwidth'] / 1e9:.0f} GB/s -> bound {r['bound_tok_s']:.1f} tok/s; reached "
              f"{r['fraction_of_bound'] * 100:.0f}% of it")
    if "load" in ratios or "convert" in ratios:
        with tempfile.TemporaryDirectory(prefix="florence_vl_bench_") as tmp:
            if "load" in ratios:
                r = ratio_load(model, Path(tmp), args.repeats)
                results["load"] = r
                print(f"\nLoading ({args.ratio_size}): Florence-VL {r['ours']:.2f} s vs LLM alone {r['llm']:.2f} s + "
                      f"native Florence-2 {r['florence2']:.2f} s = {r['parts']:.2f} s -> {r['ratio']:.2f}x "
                      f"(median of {r['runs']}, interleaved)")
            if "convert" in ratios:
                hidden, layers, vocab = (int(x) for x in args.convert_dims.split(","))
                r = ratio_convert(Path(tmp), hidden, layers, vocab)
                results["convert"] = r
                print(f"\nConverter (default options, {hidden},{layers},{vocab} bf16 synthetic release): peak RSS "
                      f"{fmt_bytes(r['peak_rss'])}, largest source shard {fmt_bytes(r['largest_shard'])} -> shard + "
                      f"{fmt_bytes(r['excess'])} ({'within' if r['ok'] else 'OVER'} the shard + 500 MiB target; "
                      f"{r['seconds']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
