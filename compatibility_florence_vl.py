"""Every difference between transformers 4.57 and 5.x that Florence-VL's files meet, in one place, each with its reason.

Shipped next to the model files: transformers copies relatively imported remote-code files along.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import transformers
from transformers.feature_extraction_utils import BatchFeature

IS_TRANSFORMERS_4 = transformers.__version__.startswith("4.")

# ---------------------------------------------------------------------------------------------------------- config
# Text-config keys that 4.57 reads and 5.x replaced by `rope_parameters`.
_LEGACY_ROPE_KEYS = ("rope_theta", "rope_scaling")


def with_legacy_rope_keys(text_config: dict[str, Any]) -> dict[str, Any]:
    """Add 4.x `rope_theta`/`rope_scaling` next to 5.x `rope_parameters`: 4.57 reading a 5.x Llama-3/Phi-3 config
    otherwise drops rope silently (theta 500000 -> 10000, no llama3/longrope scaling)."""
    rope = text_config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or any(k in text_config for k in _LEGACY_ROPE_KEYS):
        return text_config
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "longrope":
        # 4.57's Phi-3 config accepts exactly these three keys; the original length stays top-level.
        scaling = {"type": "longrope", "short_factor": scaling["short_factor"], "long_factor": scaling["long_factor"]}
    return {**text_config, "rope_theta": rope["rope_theta"], "rope_scaling": scaling}


# ---------------------------------------------------------------------------------------------------------- model
# 5.x's DaViT returns a ModelOutput and records hidden states/attentions; 4.x returns the bare (B, C, H, W) grid.
TOWER_RETURNS_MODEL_OUTPUT = not IS_TRANSFORMERS_4


def keep_in_fp32_names(names: list[str], prefix: str) -> list[str]:
    """`_keep_in_fp32_modules` as this transformers matches them: 4.x wants bare module names (matched inside full
    names), 5.x matches from the start of the full name, so it needs the model's prefix."""
    return list(names) if IS_TRANSFORMERS_4 else [prefix + name for name in names]


def is_decode_step(kwargs: dict[str, Any]) -> bool:
    """Whether `prepare_inputs_for_generation` runs after prefill: 4.x forwards pixel_values on every step (5.x drops
    them itself), so the caller must drop them to encode images once."""
    cache_position = kwargs.get("cache_position")
    return cache_position is not None and kwargs.get("use_cache", True) and int(cache_position[0]) != 0


# ---------------------------------------------------------------------------------------------------------- processor
# The PIL backend of the stock Llava image processor: the only backend measured to equal the original bit for bit.
# 5.x names it `LlavaImageProcessorPil` (plain `LlavaImageProcessor` is torchvision-based there and is what
# AutoImageProcessor picks when torchvision is installed); in 4.x plain `LlavaImageProcessor` is the PIL one.
try:
    from transformers import LlavaImageProcessorPil as PilImageProcessor
except ImportError:
    from transformers import LlavaImageProcessor as PilImageProcessor

# 4.x processors must declare their parts; 5.x infers them from __init__ (and warns that these are deprecated).
PROCESSOR_PARTS: dict[str, Any] = (
    {"attributes": ["image_processor", "tokenizer"], "image_processor_class": "AutoImageProcessor",
     "tokenizer_class": "AutoTokenizer"}
    if IS_TRANSFORMERS_4 else {}
)


def pil_image_processor(image_processor: Any) -> Any:
    """The same settings on the PIL backend (5.x's AutoImageProcessor returns the torchvision one when it can)."""
    if image_processor is None or type(image_processor) is PilImageProcessor:
        return image_processor
    settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type", "backend")}
    return PilImageProcessor(**settings)


def expand_image_tokens(
    processor: Any, texts: list[str], replacements: list[str], return_offsets: bool
) -> tuple[list[str], Optional[list[list[dict[str, Any]]]]]:
    """Each image token replaced by its image's text; 5.x's ProcessorMixin also reports where (replacement offsets,
    which its apply_chat_template uses to place assistant masks). 4.x has no such protocol."""
    if not IS_TRANSFORMERS_4:
        if not replacements:
            return texts, [[] for _ in texts]
        return processor.get_text_with_replacements(list(texts), replacements)
    if return_offsets:
        raise ValueError("return_text_replacement_offsets needs transformers 5.x.")
    return [t.replace(processor.image_token, processor.replace_image_token({}, 0)) for t in texts], None


def offsets_in_prompt(
    offset_mapping: list[list[tuple[int, int]]], texts: list[str], image_token: str, expansion: str
) -> list[list[tuple[int, int]]]:
    """4.x only: token offsets moved from the expanded text back to the text the caller passed (a token inside an
    image's expansion gets the placeholder's span). 4.57's apply_chat_template places assistant masks with these
    offsets and does not know the text was expanded; 5.x corrects them itself with the replacement offsets."""
    if not IS_TRANSFORMERS_4:
        return offset_mapping
    grown = len(expansion) - len(image_token)
    moved = []
    for offsets, text in zip(offset_mapping, texts):
        starts = [i for i in range(len(text)) if text.startswith(image_token, i)]
        spans = [(s + k * grown, s + k * grown + len(expansion), s) for k, s in enumerate(starts)]

        def back(char: int, end: bool) -> int:
            shift = 0
            for new_start, new_end, old_start in spans:
                if char < new_start or (end and char == new_start):
                    break
                if char < new_end or (end and char == new_end):
                    return old_start + (len(image_token) if end else 0)
                shift += grown
            return char - shift

        moved.append([(back(a, False), back(b, True)) if b > a else (a, b) for a, b in offsets])
    return moved


def output_flags(merged: dict[str, Any], passed: dict[str, Any]) -> tuple[Any, Any]:
    """`return_mm_token_type_ids` and `return_text_replacement_offsets` wherever this transformers routed them: 5.x to
    the top level of the merged kwargs, 4.x the first to text_kwargs (and the second nowhere)."""
    text_kwargs = merged["text_kwargs"]
    return tuple(text_kwargs.pop(key, merged.get(key, passed.get(key)))
                 for key in ("return_mm_token_type_ids", "return_text_replacement_offsets"))


def batch_feature(data: dict[str, Any], return_tensors: Optional[str]) -> BatchFeature:
    """The processor's output; 5.x's BatchFeature must be told to leave the replacement offsets (a list of dicts, which
    only 5.x produces) unconverted."""
    if "text_replacement_offsets" in data:
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])
    return BatchFeature(data=data, tensor_type=return_tensors)


def make_loadable_by_4x(folder: str) -> None:
    """Rewrite the fields 5.x's `save_pretrained` writes that 4.57 cannot read, into forms both versions read."""
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):
        config = _read(tokenizer_config)
        if config.get("tokenizer_class") in ("TokenizersBackend", None):
            # 5.x's generic name for a tokenizer.json-backed tokenizer; 4.57 knows it as PreTrainedTokenizerFast.
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if isinstance(config.get("extra_special_tokens"), list):
            # 4.57 wants a dict here; the list is the old `additional_special_tokens`, which both read.
            config["additional_special_tokens"] = config.pop("extra_special_tokens")
        _write(tokenizer_config, config)

    # 5.x nests the image processor inside processor_config.json; 4.57 reads it from preprocessor_config.json.
    processor_config = os.path.join(folder, "processor_config.json")
    preprocessor_config = os.path.join(folder, "preprocessor_config.json")
    nested = None
    if os.path.isfile(processor_config):
        config = _read(processor_config)
        nested = config.pop("image_processor", None)
        if nested is not None:
            _write(processor_config, config)
    if nested is None and os.path.isfile(preprocessor_config):
        nested = _read(preprocessor_config)
    if nested is not None:
        nested["image_processor_type"] = "LlavaImageProcessor"  # a name both versions resolve
        nested.pop("backend", None)
        _write(preprocessor_config, nested)


def _read(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
