"""Memory a Florence-VL model needs, computed (not measured) from its config: weights per storage format and the KV
cache, as the Markdown table the model cards show (converted cards: convert_checkpoint.py; the real releases' table:
benchmarks/memory_table.py).

Bytes per parameter follow each storage format:
- bfloat16 / float32: 2 / 4 bytes for every parameter;
- 8-bit (bitsandbytes LLM.int8): the LLM's decoder Linear weights 1 byte plus one float32 scale per output row; the
  rest (vision tower, Florence-2 encoder, projectors, embeddings, lm_head, norms, biases) stays bfloat16;
- 4-bit (bitsandbytes nf4/fp4, no double quantization): the same Linear weights 0.5 byte plus one float32 absmax per
  block of 64; the rest bfloat16.
KV cache: bfloat16 (float32 in the float32 row), one image (577 visual tokens) with a ~60-token chat prompt, plus 1,024
new tokens. Activations and the CUDA context are not counted; the GPU column keeps 20% of the card free for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cli_common import register_model_package

CONTEXT_TOKENS = 577 + 60 + 1024
GPUS_GB = (8, 12, 16, 24, 40, 48, 80)  # common card sizes
HEADROOM = 0.8  # share of the card the weights and KV cache may take
GIB = 1024**3


@dataclass
class Footprint:
    """Parameter counts of one release, split into what bitsandbytes quantizes and what it keeps."""

    name: str
    quantized_params: int  # LLM decoder Linear weights
    quantized_rows: int  # their output rows (one int8 scale each)
    kept_params: int
    kv_bytes_per_token: int  # bfloat16

    def weights_bytes(self, fmt: str) -> float:
        """Weight bytes in `fmt`: bfloat16, float32, int8 or nf4."""
        total = self.quantized_params + self.kept_params
        if fmt == "float32":
            return 4 * total
        if fmt == "bfloat16":
            return 2 * total
        if fmt == "int8":
            return self.quantized_params + 4 * self.quantized_rows + 2 * self.kept_params
        if fmt == "nf4":
            return 0.5 * self.quantized_params + 4 * self.quantized_params / 64 + 2 * self.kept_params
        raise ValueError(f"unknown format {fmt!r}")


def config_footprint(config: Any, name: str) -> Footprint:
    """Build the model of `config` (a FlorenceVLConfig) on the meta device and count what each storage format keeps."""
    register_model_package()
    from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration

    with torch.device("meta"):
        model = FlorenceVLForConditionalGeneration(config)
    # Parameters and saved buffers, each once (tied embeddings are one tensor under two names).
    total = sum(t.numel() for t in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values())
    quantized = [m for module_name, m in model.model.language_model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in f".{module_name}"]
    quantized_params = sum(m.weight.numel() for m in quantized)
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2
    return Footprint(name, quantized_params, sum(m.out_features for m in quantized), total - quantized_params,
                     kv_per_token)


def smallest_gpu(total_bytes: float) -> str:
    """The smallest common card size that holds `total_bytes` with 20% to spare."""
    for size in GPUS_GB:
        if total_bytes <= HEADROOM * size * 1e9:
            return f"{size} GB"
    return "> 80 GB (split with device_map)"


def size(count: float) -> str:
    """Bytes in GiB, or MiB below 0.1 GiB."""
    return f"{count / GIB:.1f} GiB" if count >= 0.1 * GIB else f"{count / 1024**2:.1f} MiB"


def table(footprints: list[Footprint]) -> str:
    """The Markdown memory table of `footprints`: weights and KV cache per storage format, and a GPU that fits."""
    rows = ["| model | weights stored as | weights | + KV cache | total | fits a GPU of |",
            "| --- | --- | ---: | ---: | ---: | --- |"]
    for fp in footprints:
        for fmt, label in (("bfloat16", "bfloat16"), ("int8", "8-bit"), ("nf4", "4-bit nf4/fp4"),
                           ("float32", "float32 (CPU default)")):
            weights = fp.weights_bytes(fmt)
            kv = fp.kv_bytes_per_token * CONTEXT_TOKENS * (2 if fmt == "float32" else 1)  # the cache's dtype
            where = "CPU RAM" if fmt == "float32" else smallest_gpu(weights + kv)
            rows.append(f"| {fp.name} | {label} | {size(weights)} | {size(kv)} | {size(weights + kv)} | {where} |")
    return "\n".join(rows)
