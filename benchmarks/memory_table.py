"""Memory needed by the real Florence-VL releases, computed (not measured) from their tensor manifests.

    python benchmarks/memory_table.py        # prints the Markdown table that README.md shows

The converted model is built on the meta device from each release's config (benchmarks/real_releases.json) and the
Florence-2 tower shapes in ../shared/fixtures/real_size_manifests.json; its parameter count is checked against the
converter's plan of the manifest. Bytes per parameter follow each storage format:
- bfloat16 / float32: 2 / 4 bytes for every parameter;
- 8-bit (bitsandbytes LLM.int8): the LLM's decoder Linear weights 1 byte plus one float32 scale per output row; the
  rest (vision tower, Florence-2 encoder, projectors, embeddings, lm_head, norms, biases) stays bfloat16;
- 4-bit (bitsandbytes nf4/fp4, no double quantization): the same Linear weights 0.5 byte plus one float32 absmax per
  block of 64; the rest bfloat16.
KV cache: bfloat16 (float32 in the float32 row), one image (577 visual tokens) with a ~60-token chat prompt, plus 1,024 new tokens. Activations
and the CUDA context are not counted; the GPU column keeps 20% of the card free for them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLORENCE_VL_SHARED", ROOT.parent / "shared"))
MANIFESTS = SHARED / "fixtures" / "real_size_manifests.json"
RELEASES = ROOT / "benchmarks" / "real_releases.json"
NAMES = {"florence_vl_8b_llava_llama": "Florence-VL 8B (Llama-3.1)", "florence_vl_3b_llava_phi": "Florence-VL 3B (Phi-3.5)"}
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


def _bootstrap() -> None:
    """Make the repo importable as the package `florence_vl` (its files use package-relative imports)."""
    sys.path.insert(0, str(ROOT))
    from cli_common import register_model_package

    register_model_package()


def config_footprint(config: "FlorenceVLConfig", name: str) -> Footprint:  # noqa: F821
    """Build the model of `config` on the meta device and count what each storage format keeps of it."""
    _bootstrap()
    from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration

    with torch.device("meta"):
        model = FlorenceVLForConditionalGeneration(config)
    total = sum(t.numel() for t in model.state_dict().values())  # parameters and saved buffers
    quantized = [m for module_name, m in model.model.language_model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in f".{module_name}"]
    quantized_params = sum(m.weight.numel() for m in quantized)
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2
    return Footprint(name, quantized_params, sum(m.out_features for m in quantized), total - quantized_params,
                     kv_per_token)


def release_footprint(release_name: str) -> Footprint:
    """The footprint of a real release, its config rebuilt from the manifest and checked against the converter's plan."""
    _bootstrap()
    import convert_checkpoint as cc
    from florence_vl.configuration_florence_vl import RELEASE_IMAGE_TOKEN_IDS

    manifest = json.loads(MANIFESTS.read_text())[release_name]
    release = json.loads(RELEASES.read_text())[release_name]
    tensors = cc.inventory_from_manifest(manifest)
    tower = {t.name: t.shape for t in tensors if t.name.startswith(cc.TOWER_PREFIX)}
    llm = cc.SUPPORTED[release["model_type"]][0]
    config = cc.build_config(release, *cc.infer_vision_configs(tower), RELEASE_IMAGE_TOKEN_IDS[llm])
    plan = cc.build_plan(tensors, *cc.target_shapes(config))
    result = config_footprint(config, NAMES[release_name])
    mapped = sum(p.source.numel for p in plan.mapped)
    if result.quantized_params + result.kept_params != mapped:
        raise RuntimeError(f"{release_name}: the model holds {result.quantized_params + result.kept_params:,} "
                           f"values, the release maps {mapped:,}")
    return result


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


if __name__ == "__main__":
    print(table([release_footprint(name) for name in NAMES]))
