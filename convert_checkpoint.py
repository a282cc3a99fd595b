"""Convert a released Florence-VL checkpoint (LLaVA-style `llava_llama` 8B or `llava_phi` 3B) into this repo's format.

    python convert_checkpoint.py SRC OUT [--vision-tower PATH_OR_ID] [--dtype auto|bfloat16|float16|float32]
                                 [--max-shard-size 5GB] [--push-to-hub REPO_ID] [--dry-run]

SRC is a local folder or a Hub id. The Florence-2 tower is taken from the shards (`model.vision_tower.vision_tower.*`)
when they hold it, else from SRC's `vision_tower/` folder, else from the repo named by `mm_vision_tower`;
`--vision-tower` overrides all three. Every source tensor is renamed by the declarative `MAPPING` table below (or
dropped by one of its rows), every tensor of the target model must be filled exactly once at the right shape, and the
weights are streamed shard by shard into a temporary folder that only becomes OUT when everything succeeded.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import signal
import string
import struct
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

ROOT = Path(__file__).resolve().parent

from cli_common import ScriptParser, looks_like_hub_id, register_model_package  # noqa: E402
from model_folder import write_model_folder  # noqa: E402

register_model_package()
from florence_vl.compatibility_florence_vl import with_dtype  # noqa: E402
from florence_vl.configuration_florence_vl import (  # noqa: E402
    FLORENCE2_LARGE_ENCODER,
    FLORENCE2_LARGE_VISION,
    IMAGE_TOKENS,
    FlorenceVLConfig,
)

TOWER_PREFIX = "model.vision_tower.vision_tower."
SUPPORTED = {"llava_llama": ("llama", "llama3"), "llava_phi": ("phi3", "phi3")}  # model_type -> (LLM, template)
BASE_MODELS = {  # the release, and what the authors trained it from
    "llava_llama": ["jiuhai/florence-vl-8b-sft", "meta-llama/Llama-3.1-8B-Instruct", "microsoft/Florence-2-large-ft"],
    "llava_phi": ["jiuhai/florence-vl-3b-sft", "microsoft/Phi-3.5-mini-instruct", "microsoft/Florence-2-large-ft"],
}
LLM_FAMILIES = {  # for the model card: the LLM's name, Hub id and licence (the weights follow the LLM's licence)
    "llava_llama": {
        "name": "Llama-3.1", "base": "meta-llama/Llama-3.1-8B-Instruct", "license": "llama3.1",
        "license_text": "The weights follow the **Llama 3.1 Community License** of the language model they contain "
                        "(https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/LICENSE), and the "
                        "Florence-2 vision encoder's MIT license (https://huggingface.co/microsoft/Florence-2-large-ft). "
                        "The model code (the four `.py` files) is MIT-licensed.",
    },
    "llava_phi": {
        "name": "Phi-3.5", "base": "microsoft/Phi-3.5-mini-instruct", "license": "mit",
        "license_text": "The weights follow the **MIT License** of Phi-3.5-mini-instruct "
                        "(https://huggingface.co/microsoft/Phi-3.5-mini-instruct/blob/main/LICENSE) and of the "
                        "Florence-2 vision encoder (https://huggingface.co/microsoft/Florence-2-large-ft). The model "
                        "code (the four `.py` files) is MIT-licensed.",
    },
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Keys of the release config.json that only the LLaVA wrapper reads; everything else describes the LLM.
LLAVA_ONLY_KEYS = re.compile(
    r"^(mm_.*|image_.*|tokenizer_.*|use_mm_proj|tune_mm_.*|freeze_mm_.*|unfreeze_mm_.*|s2.*|architectures|auto_map"
    r"|model_type|torch_dtype|dtype|transformers_version|_name_or_path|pretraining_tp)$"
)
# The BART fields the Florence-2 encoder needs; the decoder is not converted (decoder_layers=0).
BART_ENCODER_KEYS = (
    "vocab_size", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "max_position_embeddings",
    "activation_function", "scale_embedding", "pad_token_id", "bos_token_id", "eos_token_id", "init_std",
    "dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
)


class ConversionError(ValueError):
    """An expected problem with the input (missing file, wrong shapes, ...): reported in one line, no traceback."""


# ----------------------------------------------------------------------------------------------------------- mapping
@dataclass(frozen=True)
class Rule:
    """One row of the mapping: a full-match regex on the source name, its target (None = drop) and how."""

    pattern: str
    target: Optional[str]
    transform: Optional[str] = None  # "transpose"
    reason: str = ""  # why a tensor is dropped
    tied_copy: bool = False  # a tied duplicate: fills the target only when the primary tensor is absent


T = re.escape(TOWER_PREFIX)
DAVIT = T + r"vision_tower\."
BART = T + r"language_model\."
VT = "model.vision_tower."

# Ordered: the first row whose pattern matches the whole source name decides. Tower rows are written for keys inside
# the release shards; a separate tower folder's bare keys are prefixed with TOWER_PREFIX before matching.
MAPPING: list[Rule] = [
    # Language model (Llama-3 / Phi-3 layouts are kept as they are, fused Phi-3 qkv/gate_up included).
    Rule(r"lm_head\.weight", "lm_head.weight"),
    Rule(r"model\.(embed_tokens|norm)\.weight", r"model.language_model.\1.weight"),
    Rule(r"model\.layers\.(\d+)\.(.+)", r"model.language_model.layers.\1.\2"),
    # DBFusion projector `mlpNx_gelu` = Sequential(Linear, GELU, Linear, GELU, Linear): Linear i>0 sits at `i.1`.
    Rule(r"model\.mm_projector\.encoder_mlp\.0\.(weight|bias)", r"model.dbfusion_projector.linears.0.\1"),
    Rule(r"model\.mm_projector\.encoder_mlp\.(\d+)\.1\.(weight|bias)", r"model.dbfusion_projector.linears.\1.\2"),
    # DaViT backbone: original remote-code names -> transformers-native Florence-2 names.
    Rule(DAVIT + r"convs\.(\d+)\.proj\.(weight|bias)", VT + r"convs.\1.conv.\2"),
    Rule(DAVIT + r"convs\.(\d+)\.norm\.(weight|bias)", VT + r"convs.\1.norm.\2"),
    Rule(DAVIT + r"blocks\.(\d+)\.(\d+)\.(spatial|channel)_block\.(conv[12])\.fn\.dw\.(weight|bias)",
         VT + r"blocks.\1.\2.\3_block.\4.\5"),
    Rule(DAVIT + r"blocks\.(\d+)\.(\d+)\.(spatial|channel)_block\.(?:window|channel)_attn\.norm\.(weight|bias)",
         VT + r"blocks.\1.\2.\3_block.norm1.\4"),
    Rule(DAVIT + r"blocks\.(\d+)\.(\d+)\.(spatial_block\.window|channel_block\.channel)_attn\.fn\.(qkv|proj)\.(weight|bias)",
         VT + r"blocks.\1.\2.\3_attn.\4.\5"),
    Rule(DAVIT + r"blocks\.(\d+)\.(\d+)\.(spatial|channel)_block\.ffn\.norm\.(weight|bias)",
         VT + r"blocks.\1.\2.\3_block.norm2.\4"),
    Rule(DAVIT + r"blocks\.(\d+)\.(\d+)\.(spatial|channel)_block\.ffn\.fn\.net\.(fc[12])\.(weight|bias)",
         VT + r"blocks.\1.\2.\3_block.ffn.\4.\5"),
    # Florence-2 image projection: a bare Parameter used as `x @ W` in the original, an nn.Linear (W.T) here.
    Rule(T + r"image_projection", "model.vision_projector.image_projection.weight", transform="transpose"),
    Rule(T + r"image_proj_norm\.(weight|bias)", r"model.vision_projector.image_proj_norm.\1"),
    Rule(T + r"image_pos_embed\.(row|column)_embeddings\.weight",
         r"model.vision_projector.image_position_embed.\1_embeddings.weight"),
    Rule(T + r"visual_temporal_embed\.pos_idx_to_embed", "model.vision_projector.visual_temporal_embed.pos_idx_to_embed"),
    # Florence-2 BART encoder (breadth features). `shared` and `encoder.embed_tokens` are one tied tensor.
    Rule(BART + r"model\.shared\.weight", "model.breadth_encoder.embed_tokens.weight"),
    Rule(BART + r"model\.encoder\.embed_tokens\.weight", "model.breadth_encoder.embed_tokens.weight", tied_copy=True),
    Rule(BART + r"model\.encoder\.(.+)", r"model.breadth_encoder.\1"),
    # Dropped: Florence-VL never runs the Florence-2 decoder or its LM head.
    Rule(BART + r"model\.decoder\..+", None, reason="Florence-2 decoder (unused by Florence-VL)"),
    Rule(BART + r"lm_head\.weight", None, reason="Florence-2 LM head (unused by Florence-VL)"),
    Rule(BART + r"final_logits_bias", None, reason="Florence-2 final_logits_bias (unused by Florence-VL)"),
]


def match_rule(name: str, rules: list[Rule] = MAPPING) -> tuple[Optional[Rule], Optional[str]]:
    """The first rule matching `name` and the target name it gives (None, None when no rule matches)."""
    for rule in rules:
        found = re.fullmatch(rule.pattern, name)
        if found:
            return rule, (found.expand(rule.target) if rule.target is not None else None)
    return None, None


TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"transpose": lambda t: t.t().contiguous()}
SHAPE_TRANSFORMS: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {"transpose": lambda s: tuple(reversed(s))}


# ---------------------------------------------------------------------------------------------------- source tensors
@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the original checkpoint: its name as the mapping sees it and where to read it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Optional[Path] = None  # None: known from a manifest only (dry-run / tests)
    key: Optional[str] = None  # the key inside `file` (tower-folder keys lack TOWER_PREFIX)
    origin: str = "shards"  # "shards" (the release's weight files) or "tower" (a separate tower folder)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checking that the file holds all the bytes it announces."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as error:
        raise ConversionError(f"shard {path} is not a readable safetensors file ({error})") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if path.stat().st_size < 8 + length + end:
        raise ConversionError(
            f"shard {path} is truncated: {path.stat().st_size} bytes, its header needs {8 + length + end}"
        )
    return header


def list_weight_files(folder: Path, what: str) -> list[Path]:
    """The weight files of a checkpoint folder, from its index when sharded; ConversionError names what is missing."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise ConversionError(f"{what}: shard(s) {', '.join(missing)} listed in {index} are missing")
            return [folder / name for name in files]
        if (folder / single).is_file():
            return [folder / single]
    raise ConversionError(f"{what}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in {folder}")


def inventory(files: list[Path], prefix: str = "", origin: str = "shards") -> list[SourceTensor]:
    """Names, shapes and dtypes of every tensor in `files` (safetensors: headers only; .bin: memory-mapped)."""
    tensors = []
    for path in files:
        if path.suffix == ".safetensors":
            for key, entry in read_safetensors_header(path).items():
                dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise ConversionError(f"shard {path}: tensor {key} has unsupported dtype {entry['dtype']}")
                tensors.append(SourceTensor(prefix + key, tuple(entry["shape"]), dtype, path, key, origin))
        else:
            for key, value in load_bin(path).items():
                tensors.append(SourceTensor(prefix + key, tuple(value.shape), value.dtype, path, key, origin))
    return tensors


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded safely (weights only) and memory-mapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for corrupt or truncated pickles
        raise ConversionError(f"shard {path} could not be read ({type(error).__name__}: {error})") from None


def inventory_from_hub(repo_id: str, prefix: str = "", origin: str = "shards") -> list[SourceTensor]:
    """Source tensors of a Hub repo from its safetensors headers (HTTP range requests; for --dry-run)."""
    from huggingface_hub import HfApi

    try:
        metadata = HfApi().get_safetensors_metadata(repo_id)
    except Exception as error:
        raise ConversionError(f"could not read the safetensors headers of {repo_id} ({type(error).__name__})") from None
    return [
        SourceTensor(prefix + key, tuple(info.shape), SAFETENSORS_DTYPES[info.dtype], None, key, origin)
        for file in metadata.files_metadata.values()
        for key, info in file.tensors.items()
    ]


def inventory_from_manifest(manifest: dict[str, list[int]], dtype: torch.dtype = torch.bfloat16, prefix: str = "",
                            origin: str = "shards") -> list[SourceTensor]:
    """Source tensors known from a key -> shape manifest only (no weights; dry-runs and tests)."""
    return [SourceTensor(prefix + key, tuple(shape), dtype, None, key, origin) for key, shape in manifest.items()]


# ------------------------------------------------------------------------------------------------------------- plan
@dataclass
class PlannedTensor:
    """A source tensor and the target it fills."""

    source: SourceTensor
    target: str
    shape: tuple[int, ...]
    transform: Optional[str]


@dataclass
class Plan:
    """What the conversion will do: every source tensor either mapped or dropped (with the reason)."""

    mapped: list[PlannedTensor] = field(default_factory=list)
    dropped: list[tuple[SourceTensor, str]] = field(default_factory=list)

    def dropped_by_reason(self) -> Counter:
        return Counter(reason for _, reason in self.dropped)


def target_shapes(config: FlorenceVLConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Names and shapes of the target model's state dict (built on the meta device), and the names that may be
    absent because they are tied to another tensor."""
    from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration

    with torch.device("meta"):
        model = FlorenceVLForConditionalGeneration(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = set(FlorenceVLForConditionalGeneration._tied_weights_keys) if config.tie_word_embeddings else set()
    return shapes, tied


COMPONENTS = (  # target prefix -> what a user calls it, for error messages
    ("model.dbfusion_projector.", "DBFusion projector (mm_projector)"),
    ("model.vision_tower.", "vision tower (DaViT)"),
    ("model.vision_projector.", "vision tower (image projection)"),
    ("model.breadth_encoder.", "vision tower (Florence-2 encoder)"),
    ("model.language_model.", "language model"),
    ("lm_head.", "language model (lm_head)"),
)


def _names(names: list[str], limit: int = 6) -> str:
    """A short, readable list of tensor names."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def build_plan(sources: Iterable[SourceTensor], expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset(),
               excluded: Optional[Callable[[SourceTensor], Optional[str]]] = None) -> Plan:
    """Map every source tensor through MAPPING and check that the targets are exactly the model's tensors.

    `excluded(tensor)` may return a reason to drop a source tensor before mapping (e.g. a tower replaced by
    --vision-tower). Raises ConversionError listing every unmapped, unknown, doubly filled, missing or misshapen name.
    """
    plan, unmapped, unknown, wrong_shape = Plan(), [], [], []
    primaries: dict[str, PlannedTensor] = {}
    copies: dict[str, tuple[PlannedTensor, str]] = {}
    doubles: list[str] = []
    for source in sources:
        reason = excluded(source) if excluded else None
        if reason:
            plan.dropped.append((source, reason))
            continue
        rule, target = match_rule(source.name)
        if rule is None:
            unmapped.append(source.name)
            continue
        if target is None:
            plan.dropped.append((source, rule.reason))
            continue
        if target not in expected:
            unknown.append(f"{source.name} -> {target}")
            continue
        shape = SHAPE_TRANSFORMS[rule.transform](source.shape) if rule.transform else source.shape
        if shape != expected[target]:
            wrong_shape.append(f"{source.name} {list(source.shape)} -> {target} expects {list(expected[target])}")
            continue
        planned = PlannedTensor(source, target, shape, rule.transform)
        if rule.tied_copy:
            copies[target] = (planned, rule.pattern)
        elif target in primaries:
            doubles.append(f"{target} (from {primaries[target].source.name} and {source.name})")
        else:
            primaries[target] = planned
    for target, (planned, _) in copies.items():
        if target in primaries:  # the tied duplicate is the same tensor as the primary one: drop it
            plan.dropped.append((planned.source, f"tied copy of {primaries[target].source.name}"))
        else:
            primaries[target] = planned
    plan.mapped = list(primaries.values())

    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} source tensor(s) match no mapping rule: {_names(unmapped)}")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) map to names the model does not have: {_names(unknown)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensor(s) have the wrong shape: {_names(wrong_shape, 4)}")
    if doubles:
        problems.append(f"{len(doubles)} target(s) filled twice: {_names(doubles, 4)}")
    missing = [name for name in expected if name not in primaries and name not in optional]
    for prefix, component in COMPONENTS:
        names = [name for name in missing if name.startswith(prefix)]
        if names:
            problems.append(f"missing {component} weights: {len(names)} tensor(s) not found, e.g. {_names(names, 3)}")
    if problems:
        raise ConversionError("; ".join(problems))
    return plan


# ----------------------------------------------------------------------------------------------------------- configs
def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file, or a ConversionError naming it."""
    if not path.is_file():
        raise ConversionError(f"{what}: {path} not found")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ConversionError(f"{what}: {path} is not valid JSON ({error})") from None


def text_config_from_release(release: dict[str, Any]) -> dict[str, Any]:
    """The LLM config: the release config.json without the LLaVA-only keys, rope settings kept as written."""
    model_type = release.get("model_type")
    if model_type not in SUPPORTED:
        raise ConversionError(
            f"unsupported model_type {model_type!r} in config.json: expected one of {', '.join(SUPPORTED)}"
        )
    text = {k: v for k, v in release.items() if not LLAVA_ONLY_KEYS.match(k)}
    return {"model_type": SUPPORTED[model_type][0], **text}


def vision_configs_from_florence2(florence2: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Florence2VisionConfig and BART-encoder fields from an original (remote-code) Florence-2 config.json."""
    vision = florence2.get("vision_config") or {}
    text = florence2.get("text_config") or {}
    if not vision or not text:
        raise ConversionError("the tower config.json lacks vision_config or text_config (not a Florence-2 config)")
    sources = vision.get("image_feature_source", ["spatial_avg_pool", "temporal_avg_pool"])
    if list(sources) != ["spatial_avg_pool", "temporal_avg_pool"]:
        raise ConversionError(f"unsupported Florence-2 image_feature_source {sources} (expected spatial+temporal avg pool)")
    if text.get("add_final_layer_norm") or text.get("normalize_before"):
        raise ConversionError("unsupported Florence-2 text config: pre-norm BART (normalize_before/add_final_layer_norm)")
    vision_config = {
        "depths": vision["depths"],
        "embed_dim": vision["dim_embed"],
        "num_heads": vision["num_heads"],
        "num_groups": vision["num_groups"],
        "patch_size": vision["patch_size"],
        "patch_stride": vision["patch_stride"],
        "patch_padding": vision["patch_padding"],
        "patch_prenorm": vision["patch_prenorm"],
        "window_size": vision.get("window_size", 12),
        "drop_path_rate": vision.get("drop_path_rate", 0.0),
        "projection_dim": vision.get("projection_dim", florence2.get("projection_dim")),
        "max_position_embeddings": vision.get("image_pos_embed", {}).get("max_pos_embeddings", 50),
        "max_temporal_embeddings": vision.get("visual_temporal_embedding", {}).get("max_temporal_embeddings", 100),
    }
    encoder_config = {k: text[k] for k in BART_ENCODER_KEYS if k in text}
    encoder_config["decoder_layers"] = 0  # Florence-VL runs the encoder only
    return vision_config, encoder_config


def infer_vision_configs(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Florence-2 vision/encoder configs from tower tensor shapes, when no tower config.json is reachable.

    Widths, depths, patch sizes and table sizes follow from the shapes; attention heads and the window size do not,
    so they are taken from Florence-2-large (the tower of both releases) and the widths must match it.
    """
    def shape(name: str) -> tuple[int, ...]:
        return shapes[TOWER_PREFIX + name]

    def indices(pattern: str) -> set[tuple[int, ...]]:
        found = (re.match(re.escape(TOWER_PREFIX) + pattern, name) for name in shapes)
        return {tuple(map(int, m.groups())) for m in found if m}

    stages = sorted(i for (i,) in indices(r"vision_tower\.convs\.(\d+)\."))
    if not stages:
        raise ConversionError("missing vision tower weights: no DaViT tensors (vision_tower.convs.*) found")
    embed_dim = [shape(f"vision_tower.convs.{i}.proj.weight")[0] for i in stages]
    if embed_dim != list(FLORENCE2_LARGE_VISION["embed_dim"]):
        raise ConversionError(
            f"no tower config.json found and the tower widths {embed_dim} are not Florence-2-large's, so attention "
            "heads cannot be inferred: pass --vision-tower with the Florence-2 tower folder"
        )
    depths = Counter(stage for stage, _ in indices(r"vision_tower\.blocks\.(\d+)\.(\d+)\."))
    vision = dict(FLORENCE2_LARGE_VISION)
    vision.update(
        depths=[depths[i] for i in stages],
        embed_dim=embed_dim,
        patch_size=[shape(f"vision_tower.convs.{i}.proj.weight")[2] for i in stages],
        projection_dim=shape("image_projection")[1],
        max_position_embeddings=shape("image_pos_embed.row_embeddings.weight")[0],
        max_temporal_embeddings=shape("visual_temporal_embed.pos_idx_to_embed")[0],
    )
    embeddings = shapes.get(TOWER_PREFIX + "language_model.model.shared.weight") or shape(
        "language_model.model.encoder.embed_tokens.weight")
    layers = indices(r"language_model\.model\.encoder\.layers\.(\d+)\.")
    encoder = dict(FLORENCE2_LARGE_ENCODER)
    encoder.update(
        vocab_size=embeddings[0],
        d_model=embeddings[1],
        encoder_layers=len(layers),
        encoder_ffn_dim=shape("language_model.model.encoder.layers.0.fc1.weight")[0],
        max_position_embeddings=shape("language_model.model.encoder.embed_positions.weight")[0] - 2,
    )
    return vision, encoder


def projector_depth(release: dict[str, Any]) -> int:
    """Number of linear layers of the `mlpNx_gelu` projector named by mm_projector_type."""
    kind = release.get("mm_projector_type", "mlp3x_gelu")
    found = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not found:
        raise ConversionError(f"unsupported mm_projector_type {kind!r}: expected mlpNx_gelu")
    return int(found.group(1))


def build_config(release: dict[str, Any], vision: dict[str, Any], encoder: dict[str, Any],
                 image_token_id: int) -> FlorenceVLConfig:
    """The FlorenceVLConfig of the converted model; `image_token_id` is the processor's (its tokenizer's id)."""
    try:
        config = FlorenceVLConfig(
            vision_config=vision,
            breadth_encoder_config=encoder,
            text_config=text_config_from_release(release),
            projector_depth=projector_depth(release),
            image_token_id=image_token_id,
        )
    except ValueError as error:
        raise ConversionError(f"the release's config: {error}") from None
    config.architectures = ["FlorenceVLForConditionalGeneration"]
    return config


# ------------------------------------------------------------------------------------------------------------ source
def resolve_folder(path_or_id: str, what: str, weights: bool = True) -> Path:
    """A local folder, or a Hub repo downloaded with huggingface_hub (config and tokenizer only unless `weights`)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not looks_like_hub_id(path_or_id):
        raise ConversionError(f"{what}: folder {path_or_id} not found (and it is not a Hub repo id)")
    from huggingface_hub import snapshot_download

    patterns = None if weights else ["*.json", "*.jinja", "*.model", "*.txt", "vision_tower/*.json"]
    try:
        return Path(snapshot_download(path_or_id, allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, gated, ...
        raise ConversionError(f"{what}: {path_or_id} is neither a local folder nor a reachable Hub repo "
                              f"({type(error).__name__})") from None


@dataclass
class Source:
    """Everything read from the release: configs, tensors and where the tower came from."""

    folder: Path
    release: dict[str, Any]
    tensors: list[SourceTensor]
    vision: dict[str, Any]
    encoder: dict[str, Any]
    tower_note: str
    excluded: Optional[Callable[[SourceTensor], Optional[str]]]


def replaced_tower(tensor: SourceTensor) -> Optional[str]:
    """Drop reason for the shards' own tower tensors when --vision-tower supplies the tower."""
    if tensor.origin == "shards" and tensor.name.startswith(TOWER_PREFIX):
        return "tower in the shards, replaced by --vision-tower"
    return None


def find_tower_folder(src: Path, release: dict[str, Any], override: Optional[str], weights: bool) -> Optional[Path]:
    """The Florence-2 tower folder: --vision-tower, else SRC/vision_tower, else mm_vision_tower (local or Hub)."""
    if override:
        return resolve_folder(override, "--vision-tower", weights=weights)
    if (src / "vision_tower" / "config.json").is_file():
        return src / "vision_tower"
    named = release.get("mm_vision_tower")
    if not named:
        return None
    if (src / named).is_dir():
        return src / named
    try:
        return resolve_folder(named, "mm_vision_tower", weights=weights)
    except ConversionError:
        return None


def read_source(src_arg: str, tower_arg: Optional[str], dry_run: bool) -> Source:
    """Locate and inventory the release (headers only), choose the tower's weights and config."""
    src = resolve_folder(src_arg, "SRC", weights=not dry_run)
    release = read_json(src / "config.json", "SRC config")
    text_config_from_release(release)  # fail early on an unknown model_type
    if dry_run and not Path(src_arg).expanduser().is_dir():
        tensors = inventory_from_hub(src_arg)  # headers over HTTP: no weights downloaded
    else:
        tensors = inventory(list_weight_files(src, f"SRC {src}"))
    in_shards = any(t.name.startswith(TOWER_PREFIX) for t in tensors)

    excluded = None
    tower = None
    if tower_arg or not in_shards:
        tower = find_tower_folder(src, release, tower_arg, weights=not dry_run)
        if tower is None:
            raise ConversionError(
                "missing vision tower weights: the shards hold no model.vision_tower.vision_tower.* tensors, SRC has "
                f"no vision_tower/ folder and mm_vision_tower {release.get('mm_vision_tower')!r} was not found; "
                "pass --vision-tower"
            )
        if dry_run and tower_arg and not Path(tower_arg).expanduser().is_dir():
            tensors += inventory_from_hub(tower_arg, prefix=TOWER_PREFIX, origin="tower")
        else:
            files = list_weight_files(tower, f"vision tower {tower}")
            tensors += inventory(files, prefix=TOWER_PREFIX, origin="tower")
        tower_note = f"tower weights from {tower}"
        if in_shards:
            excluded = replaced_tower
    else:
        tower = find_tower_folder(src, release, None, weights=False)
        tower_note = "tower weights from the shards"

    if tower is not None and (tower / "config.json").is_file():
        vision, encoder = vision_configs_from_florence2(read_json(tower / "config.json", "tower config"))
        tower_note += f", tower config from {tower / 'config.json'}"
    else:
        shapes = {t.name: t.shape for t in tensors if t.name.startswith(TOWER_PREFIX)}
        vision, encoder = infer_vision_configs(shapes)
        tower_note += ", tower config inferred from shapes (heads/window of Florence-2-large)"
    return Source(src, release, tensors, vision, encoder, tower_note, excluded)


# ----------------------------------------------------------------------------------------------------------- writing
def parse_size(text: str) -> int:
    """Bytes in a size such as 5GB, 500MB, 2GiB or 1000 (decimal units as transformers uses them)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text.upper())
    if not found:
        raise ConversionError(f"--max-shard-size {text!r} is not a size like 5GB or 500MB")
    number, unit, binary = found.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


def output_dtype(tensor_dtype: torch.dtype, requested: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a tensor is written in: the requested one for floating tensors, else its own."""
    return requested if requested is not None and tensor_dtype.is_floating_point else tensor_dtype


def assign_shards(mapped: list[PlannedTensor], requested: Optional[torch.dtype], max_bytes: int) -> list[list[PlannedTensor]]:
    """Group tensors, in source order, into shards of at most `max_bytes` (a bigger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for planned in mapped:
        nbytes = planned.source.numel * output_dtype(planned.source.dtype, requested).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += nbytes
    return shards


class TensorReader:
    """Reads source tensors one at a time and closes each file after its last tensor (its pages leave memory)."""

    def __init__(self, planned: list[PlannedTensor]) -> None:
        self._remaining = Counter(p.source.file for p in planned)
        self._handles: dict[Path, Any] = {}
        self._bin: tuple[Optional[Path], dict[str, torch.Tensor]] = (None, {})

    def get(self, source: SourceTensor) -> torch.Tensor:
        """The tensor `source` describes, checked against the shape its header announced."""
        if source.file.suffix == ".safetensors":
            from safetensors import safe_open

            if source.file not in self._handles:
                self._handles[source.file] = safe_open(str(source.file), framework="pt")
            tensor = self._handles[source.file].get_tensor(source.key)
        else:
            if self._bin[0] != source.file:
                self._bin = (source.file, load_bin(source.file))
            tensor = self._bin[1][source.key]
        self._remaining[source.file] -= 1
        if not self._remaining[source.file]:
            self._handles.pop(source.file, None)
            if self._bin[0] == source.file:
                self._bin = (None, {})
        if tuple(tensor.shape) != source.shape:
            raise ConversionError(f"{source.file}: {source.key} has shape {list(tensor.shape)}, expected {list(source.shape)}")
        return tensor


def safetensors_header(entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    """The header of a safetensors file holding `entries` in this order (8-byte length + JSON, 8-aligned)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_weights(shards: list[list[PlannedTensor]], folder: Path, requested: Optional[torch.dtype]) -> int:
    """Write the safetensors shards (and the index when there are several); returns the total bytes written.

    Each shard is streamed: its header is known from the plan, so tensors are written one at a time as they are
    read (safetensors' own writer needs the whole shard in memory); memory stays about one tensor plus one source file.
    """
    from tqdm.auto import tqdm

    reader, weight_map, total = TensorReader([p for shard in shards for p in shard]), {}, 0
    for number, shard in enumerate(shards, start=1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        entries = [(p.target, p.shape, output_dtype(p.source.dtype, requested)) for p in shard]
        with open(folder / name, "wb") as file:
            file.write(safetensors_header(entries))
            for planned in tqdm(shard, desc=f"shard {number}/{len(shards)}", unit="tensor", file=sys.stdout):
                tensor = reader.get(planned.source)
                if planned.transform:
                    tensor = TRANSFORMS[planned.transform](tensor)
                tensor = tensor.to(output_dtype(tensor.dtype, requested)).contiguous()
                if tuple(tensor.shape) != planned.shape:
                    raise ConversionError(f"{planned.target}: got shape {list(tensor.shape)}, planned {list(planned.shape)}")
                data = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else tensor.new_empty(0, dtype=torch.uint8)
                file.write(memoryview(data.numpy()))  # no extra copy of the tensor
                weight_map[planned.target] = name
                total += tensor.numel() * tensor.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


# The line of each chat template that says what the original's ids start with before the prompt's own text.
RELEASE_BOS_LINE = re.compile(r"\{%- set release_bos = '[^']*' -%\}")


def release_bos(tokenizer: Any, llm: str, tokenizer_config: dict[str, Any]) -> str:
    """The BOS text the original's ids start with before the prompt's own text, read off the release tokenizer the
    way the original tokenizes (LLaVA's tokenizer_image_token: the tokenizer's own call on each chunk of the prompt
    split at <image>; when the first chunk starts with the BOS id, that BOS is kept once and the first id of every
    chunk dropped): the BOS token when the tokenizer adds one, else "". A Llama tokenizer class's `add_bos_token`
    (tokenizer_config.json) decides as it did under the original's transformers 4.x. ConversionError for what a chat
    template cannot express."""
    plain, own = (tokenizer("x", add_special_tokens=flag)["input_ids"] for flag in (False, True))
    adds_bos = tokenizer.bos_token_id is not None and own == [tokenizer.bos_token_id, *plain]
    if str(tokenizer_config.get("tokenizer_class", "")).startswith("LlamaTokenizer"):
        # The original ran on transformers 4.x, whose LlamaTokenizer(Fast) rebuilds the post-processor from this flag
        # (default: add) whatever tokenizer.json says; 5.x keeps tokenizer.json's (measured on 5.23.0). Read it as 4.x.
        adds_bos = tokenizer.bos_token_id is not None and tokenizer_config.get("add_bos_token") is not False
        own = [tokenizer.bos_token_id, *plain] if adds_bos else plain
    if own != plain and not adds_bos:
        raise ConversionError(f"the release tokenizer adds special tokens other than one leading BOS ({own} for 'x', "
                              f"{plain} without them): no chat template gives the original's ids for that")
    if llm == "llama" and not adds_bos:
        raise ConversionError(
            "the release's Llama-3 tokenizer adds no BOS: the original then keeps the prompt's literal "
            "<|begin_of_text|> as its BOS and drops the first id after every image, which no chat template can "
            "express; convert with the release's own tokenizer (it adds <|begin_of_text|>)"
        )
    return tokenizer.bos_token if adds_bos else ""


def release_chat_template(name: str, bos: str) -> str:
    """The release's prompt format, chat_templates/<name>.jinja, with its BOS rule (`release_bos`) written in."""
    path = ROOT / "chat_templates" / f"{name}.jinja"
    template = path.read_text() if path.is_file() else ""
    if len(RELEASE_BOS_LINE.findall(template)) != 1:
        raise ConversionError(f"chat_templates/{name}.jinja is missing or has no single release_bos line")
    return RELEASE_BOS_LINE.sub(lambda _: "{%- set release_bos = " + repr(bos) + " -%}", template)


def florence_vl_tokenizer(tokenizer: Any) -> Any:
    """The LLM tokenizer as a Florence-VL folder saves it: it adds no special tokens itself (the chat template writes
    them all, so clients that tokenize with `add_special_tokens=False` and those that do not get the same ids) and it
    pads on the left (generation continues on the right)."""
    from tokenizers import processors

    for flag in ("add_bos_token", "add_eos_token"):  # 4.57's LlamaTokenizerFast rebuilds its post-processor from these
        tokenizer.init_kwargs[flag] = False
        if hasattr(tokenizer, flag):
            setattr(tokenizer, flag, False)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"
    return tokenizer


def build_processor(src: Path, text_config: dict[str, Any], model_type: str) -> Any:
    """The processor: the release's LLM tokenizer, whose reserved IMAGE_TOKENS entry marks images, Florence-2 images,
    the release's chat template."""
    from transformers import AutoConfig, AutoTokenizer

    from florence_vl.processing_florence_vl import FlorenceVLProcessor

    text_config = dict(text_config)
    try:  # given the LLM config: transformers cannot parse a `llava_*` config.json
        tokenizer = AutoTokenizer.from_pretrained(
            str(src), config=AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        )
    except Exception as error:
        raise ConversionError(f"the LLM tokenizer in {src} could not be loaded ({type(error).__name__}: {error})") from None
    llm, template = SUPPORTED[model_type]
    config_file = src / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    bos = release_bos(tokenizer, llm, tokenizer_config)  # before florence_vl_tokenizer makes it add nothing
    print("Prompt rule, read off the release tokenizer: " + (
        f"it adds {bos} to each call, so the original's ids start with it (once), then the prompt's text"
        if bos else "it adds no BOS, so the original's ids start with the prompt's text") + "; the template writes it")
    try:
        return FlorenceVLProcessor(tokenizer=florence_vl_tokenizer(tokenizer),
                                   chat_template=release_chat_template(template, bos), image_token=IMAGE_TOKENS[llm])
    except ValueError as error:
        raise ConversionError(f"the LLM tokenizer in {src}: {error}") from None


def write_generation_config(src: Path, release: dict[str, Any], folder: Path) -> None:
    """generation_config.json with the release's settings and special ids (eos may be a list), version-neutral JSON."""
    path = src / "generation_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    settings = {k: v for k, v in settings.items() if k not in ("transformers_version", "_from_model_config")}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if settings.get(key) is None and release.get(key) is not None:
            settings[key] = release[key]
    (folder / "generation_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def card_title(parameters: int, model_type: str) -> str:
    """"Florence-VL 8B (Llama-3.1)" for the release; a small test conversion is titled by its own size."""
    count = f"{parameters / 1e9:.0f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"
    return f"Florence-VL {count} ({LLM_FAMILIES[model_type]['name']})"


def model_card(model_type: str, src: str, config: FlorenceVLConfig, parameters: int, model_id: str) -> str:
    """The Hub card of this checkpoint, from docs/model_card_template.md. Its snippets load `model_id` (the Hub id,
    or the folder's absolute path before upload) and run from any directory."""
    from memory_footprint import config_footprint, table

    family = LLM_FAMILIES[model_type]
    is_hub_id = not Path(src).expanduser().exists() and looks_like_hub_id(src)
    source = src if is_hub_id else f"a local copy of a LLaVA-format release ({Path(src).name})"
    local = model_id.startswith("/")
    image_line = (f'image = "{model_id}/assets/example.png"  # an example image shipped in this folder' if local
                  else "from huggingface_hub import hf_hub_download\n\n"
                       f'image = hf_hub_download("{model_id}", "assets/example.png")  # an example shipped with the model')
    title = card_title(parameters, model_type)
    card = string.Template((ROOT / "docs" / "model_card_template.md").read_text()).substitute(
        title=title, model_id=model_id, image_line=image_line, image_tokens=config.image_seq_length,
        source=f"`{source}`" if is_hub_id else source, parameters=f"{parameters:,}", llm=family["name"],
        llm_id=family["base"], license=family["license"], license_text=family["license_text"],
        base_models="\n".join(f"  - {b}" for b in BASE_MODELS[model_type]),
        memory_table=table([config_footprint(config, title)]),
    )
    return card


def write_config(config: FlorenceVLConfig, folder: Path, dtype_name: str) -> None:
    """config.json (legacy rope keys included by FlorenceVLConfig.to_json_string), with the weights' dtype."""
    config.save_pretrained(str(folder))
    path = folder / "config.json"
    path.write_text(json.dumps(with_dtype(json.loads(path.read_text()), dtype_name), indent=2, sort_keys=True) + "\n")


# -------------------------------------------------------------------------------------------------------------- main
def format_bytes(count: int) -> str:
    """A human-readable size."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.2f} {unit}" if unit != "B" else f"{count} B"
        count /= 1000
    return f"{count} B"


def print_plan(plan: Plan, shards: list[list[PlannedTensor]], requested: Optional[torch.dtype], note: str) -> None:
    """The conversion plan (dry-run) or summary: what is mapped, what is dropped and why, how it is sharded."""
    size = sum(p.source.numel * output_dtype(p.source.dtype, requested).itemsize for p in plan.mapped)
    params = sum(p.source.numel for p in plan.mapped)
    print(f"  {note}")
    print(f"  tensors mapped: {len(plan.mapped)} ({params:,} parameters)")
    print(f"  tensors dropped: {len(plan.dropped)}")
    for reason, count in sorted(plan.dropped_by_reason().items()):
        print(f"    - {count:5d}  {reason}")
    print(f"  shards: {len(shards)}, total size: {format_bytes(size)}")


def publish_permissions(folder: Path) -> None:
    """Give the staged folder the usual permissions (mkdtemp and safetensors create owner-only entries): folders
    listable and enterable (rwx by umask), files readable (rw by umask), all the way down."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def prepare_out(out: Path) -> None:
    """Refuse an OUT that already holds something (the result is moved there only at the end)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"OUT {out} already exists and is not an empty folder")


def staging_folder(out: Path) -> Path:
    """A new hidden folder beside OUT (same disk: the final move is a rename), named after OUT and this process."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))


def remove_stale_staging(out: Path) -> None:
    """Remove the staging folders that an earlier conversion to OUT left when it was killed outright (SIGKILL, power
    loss: no handler runs), recognised by their name and a process id that no longer runs."""
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        pid = folder.name[len(out.name) + 2:].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # a conversion still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's running process
        shutil.rmtree(folder, ignore_errors=True)
        print(f"Removed {folder}, left by a conversion to {out.name} that was killed")


def stop_on_sigterm() -> None:
    """Make SIGTERM (kill, a scheduler's timeout) end the conversion like Ctrl-C, so its staging folder is removed."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def convert(src: str, out: Optional[str], vision_tower: Optional[str] = None, dtype: str = "auto",
            max_shard_size: str = "5GB", push_to_hub: Optional[str] = None, dry_run: bool = False,
            repo_id: Optional[str] = None) -> Plan:
    """Convert SRC into a complete repo folder at OUT (or, with dry_run, only validate and print the plan).

    The model card's snippets load `repo_id` (default: the --push-to-hub id, else OUT's absolute path)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    requested = DTYPES.get(dtype)
    max_bytes = parse_size(max_shard_size)
    out_path = Path(out).expanduser().resolve() if out else None
    if out_path is not None and not dry_run:
        prepare_out(out_path)

    source = read_source(src, vision_tower, dry_run)
    model_type = source.release["model_type"]
    processor = build_processor(source.folder, text_config_from_release(source.release), model_type)
    config = build_config(source.release, source.vision, source.encoder, processor.image_token_id)
    expected, optional = target_shapes(config)
    plan = build_plan(source.tensors, expected, optional, source.excluded)
    shards = assign_shards(plan.mapped, requested, max_bytes)
    if dry_run:
        print(f"Dry run: {src} ({model_type}) validates; the conversion would write:")
        print_plan(plan, shards, requested, source.tower_note)
        return plan

    floating = Counter(output_dtype(p.source.dtype, requested) for p in plan.mapped if p.source.dtype.is_floating_point)
    dtype_name = str(floating.most_common(1)[0][0]).removeprefix("torch.") if floating else "float32"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_path)
    staging = staging_folder(out_path)
    try:
        print(f"Converting {src} ({model_type}) -> {out_path}")
        write_weights(shards, staging, requested)
        write_config(config, staging, dtype_name)
        write_generation_config(source.folder, source.release, staging)
        card = model_card(model_type, src, config, sum(p.source.numel for p in plan.mapped),
                          repo_id or push_to_hub or str(out_path))
        write_model_folder(staging, processor, card)
        publish_permissions(staging)
        if out_path.is_dir():
            out_path.rmdir()  # empty (checked above)
        os.replace(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"Done: {out_path}")
    print_plan(plan, shards, requested, source.tower_note)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(repo_id=push_to_hub, folder_path=str(out_path))
        print(f"Pushed to https://huggingface.co/{push_to_hub}")
    return plan


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="release folder or Hub id (llava_llama 8B or llava_phi 3B)")
    parser.add_argument("out", nargs="?", help="output folder (must not exist or be empty; optional with --dry-run)")
    parser.add_argument("--vision-tower", help="Florence-2 tower folder or Hub id (overrides the shards' tower)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weight dtype (auto: unchanged)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the converted folder to this Hub repo")
    parser.add_argument("--repo-id", help="Hub id the model card's examples load (default: the --push-to-hub id, "
                                          "else OUT's absolute path)")
    parser.add_argument("--dry-run", action="store_true", help="validate mapping and shapes from headers; write nothing")
    args = parser.parse_args(argv)
    if args.out is None and not args.dry_run:
        parser.error("OUT is required unless --dry-run")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: expected problems end in a one-line `error:` message and exit status 1, never a traceback."""
    args = parse_args(argv)
    stop_on_sigterm()
    try:
        convert(args.src, args.out, args.vision_tower, args.dtype, args.max_shard_size, args.push_to_hub, args.dry_run,
                args.repo_id)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to OUT (the partial conversion was removed)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
