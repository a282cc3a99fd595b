"""Every difference between transformers 4.57 and 5.x that Florence-VL's files meet, in one place, each with its reason.

Shipped next to the model files: transformers copies relatively imported remote-code files along.
"""

# No `from __future__ import annotations`: transformers 4.57's processor tests read `Unpack[...]` off __call__'s
# signature (the 4.x processor base's below).
import json
import os
import re
from typing import Any, Union

import transformers
from PIL import Image
from transformers import PretrainedConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack

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


def rope_settings(text_config: Any) -> dict[str, Any]:
    """A loaded LLM config's rope settings in one form for both versions: 5.x keeps them in `rope_parameters`; 4.57 in
    `rope_theta` and `rope_scaling` (Phi-3's with the legacy `type` key and its original context at the top level)."""
    if IS_TRANSFORMERS_4:
        rope = {**(text_config.rope_scaling or {}), "rope_theta": text_config.rope_theta}
    else:
        rope = dict(text_config.rope_parameters)
    legacy = rope.pop("type", None)
    rope["rope_type"] = rope.get("rope_type") or legacy or "default"
    rope.setdefault("original_max_position_embeddings", getattr(text_config, "original_max_position_embeddings", None))
    rope.setdefault("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", None) or 1.0)
    return rope


class ConfigBase(PretrainedConfig):
    """PretrainedConfig whose JSON both versions read: 5.x writes the LLM's rope settings as `rope_parameters` only,
    which 4.57 drops silently, so the 4.x keys are written beside them (`with_legacy_rope_keys`)."""

    def to_json_string(self, use_diff: bool = True) -> str:
        """JSON as transformers writes it, plus the LLM's rope settings in 4.x form in text_config; `to_dict` stays
        transformers' own."""
        data = json.loads(super().to_json_string(use_diff=use_diff))
        if isinstance(data.get("text_config"), dict):
            data["text_config"] = with_legacy_rope_keys(data["text_config"])
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def with_dtype(config: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    """A saved config's JSON with the weights' dtype under the key both versions read: 4.57 reads `torch_dtype` only,
    5.x writes `dtype` and reads `torch_dtype` as its deprecated alias."""
    return {**{k: v for k, v in config.items() if k != "dtype"}, "torch_dtype": dtype_name}


# ---------------------------------------------------------------------------------------------------------- model
def run_vision_tower(tower: Any, pixel_values: Any, **kwargs) -> BaseModelOutputWithPooling:
    """The DaViT tower's output as a ModelOutput: 5.x's tower returns one and records hidden states/attentions; 4.x's
    returns the bare (B, C, H, W) grid and records neither."""
    if IS_TRANSFORMERS_4:
        return BaseModelOutputWithPooling(last_hidden_state=tower(pixel_values))
    return tower(pixel_values, **kwargs)


def image_features_tensor(features: Any) -> Any:
    """Native Florence-2's `get_image_features` result as a tensor: 5.x returns a ModelOutput (`pooler_output`), 4.x
    the tensor itself."""
    return features if IS_TRANSFORMERS_4 else features.pooler_output


def keep_in_fp32_names(names: list[str], prefix: str) -> list[str]:
    """`_keep_in_fp32_modules` as this transformers matches them: 4.x wants bare module names (matched inside full
    names), 5.x matches from the start of the full name, so it needs the model's prefix."""
    return list(names) if IS_TRANSFORMERS_4 else [prefix + name for name in names]


def cached_length(past_key_values: Any, kwargs: dict[str, Any]) -> int:
    """How many leading positions of `prepare_inputs_for_generation`'s full input_ids the cache already holds: 4.x
    passes `cache_position` (the slice it feeds the model), 5.x passes none and slices by the cache's own length."""
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        return int(cache_position[0]) if kwargs.get("use_cache", True) else 0
    return past_key_values.get_seq_length() if past_key_values is not None else 0


# ---------------------------------------------------------------------------------------------------------- training
# TrainingArguments' name for gradient checkpointing: 5.x renamed it (the old name warns on every run).
CHECKPOINTING_ARGUMENT = "gradient_checkpointing" if IS_TRANSFORMERS_4 else "activation_checkpointing"


# ---------------------------------------------------------------------------------------------------------- processor
# The PIL backend of the stock Llava image processor: the only backend measured to equal the original bit for bit.
# 5.x names it `LlavaImageProcessorPil` (plain `LlavaImageProcessor` is torchvision-based there and is what
# AutoImageProcessor picks when torchvision is installed); in 4.x plain `LlavaImageProcessor` is the PIL one.
try:
    from transformers import LlavaImageProcessorPil as PilImageProcessor
except ImportError:
    from transformers import LlavaImageProcessor as PilImageProcessor

def pil_image_processor(image_processor: Any) -> Any:
    """The same settings on the PIL backend (5.x's AutoImageProcessor returns the torchvision one when it can)."""
    if image_processor is None or type(image_processor) is PilImageProcessor:
        return image_processor
    settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type", "backend")}
    return PilImageProcessor(**settings)


class _Processor5x(ProcessorMixin):
    """5.x's ProcessorMixin, whose call Florence-VL's processor uses as it is; only saving differs."""

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs) -> Any:
        """Save, then rewrite the few fields 5.x writes that 4.57 cannot read (folders must load under both)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        make_loadable_by_4x(str(save_directory))
        return result


class _Processor4x(ProcessorMixin):
    """4.57's ProcessorMixin, completed with what Florence-VL's processor takes from 5.x's: declared parts (5.x infers
    them from __init__) and 5.x's call, which 4.57 lacks (its call runs each part alone and expands no placeholder).
    The processor's hooks (`prepare_inputs_layout`, `validate_inputs`, `replace_image_token`) and the mixin's own
    truncation check (`_check_special_mm_tokens`) run here in the order 5.x runs them."""

    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Unpack[ProcessingKwargs]) -> BatchFeature:
        """Preprocess `images`, expand each image placeholder of `text` and tokenize it, as 5.x's mixin does (other
        modalities as keyword arguments only: 4.57's conformance tests take a `videos` parameter for video support)."""
        videos, audio = kwargs.pop("videos", None), kwargs.pop("audio", None)
        images, text, _, _ = self.prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)
        self.validate_inputs(images=images, text=text)
        merged = self._merge_kwargs(self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs,
                                    **kwargs)
        text_kwargs, image_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        # 4.x routes this one to text_kwargs; 5.x reports where placeholders were replaced, 4.x has no such protocol.
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", kwargs.get("return_mm_token_type_ids"))
        if kwargs.get("return_text_replacement_offsets"):
            raise ValueError("return_text_replacement_offsets needs transformers 5.x.")
        # A common kwarg: _merge_kwargs puts it in both; the tensors are built once, at the end.
        image_return_tensors = image_kwargs.pop("return_tensors", None)
        return_tensors = text_kwargs.pop("return_tensors", None) or image_return_tensors
        data: dict[str, Any] = {}
        if images:
            # Known layout: 4.57 otherwise guesses the channel axis of a 1x1 image wrongly.
            if all(isinstance(image, Image.Image) for image in images):
                image_kwargs.setdefault("input_data_format", "channels_last")
            data.update(self.image_processor(images, **image_kwargs))
        if text is not None:
            replacements = [self.replace_image_token(data, index) for index in range(len(images or []))]
            expanded, spans = self._expand_placeholders(text, replacements)
            encoding = self.tokenizer(expanded, return_token_type_ids=False, **text_kwargs)
            self._check_special_mm_tokens(expanded, encoding, modalities=["image"])
            if "offset_mapping" in encoding:
                encoding["offset_mapping"] = [self._offsets_in_caller_text(offsets, text_spans)
                                              for offsets, text_spans in zip(encoding["offset_mapping"], spans)]
            data.update(encoding)
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in ids] for ids in data["input_ids"]]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _expand_placeholders(self, texts: list[str], replacements: list[str]) -> tuple[list[str], list[list[tuple]]]:
        """Each image token replaced by its image's text, in order, and where: (old start, old end, new start,
        new end) per placeholder."""
        queue, expanded, spans = iter(replacements), [], []
        for text in texts:
            pieces, found, last, grown = [], [], 0, 0
            for match in re.finditer(re.escape(self.image_token), text):
                replacement = next(queue)
                pieces += [text[last:match.start()], replacement]
                found.append((match.start(), match.end(), match.start() + grown,
                              match.start() + grown + len(replacement)))
                grown += len(replacement) - len(match.group())
                last = match.end()
            expanded.append("".join(pieces) + text[last:])
            spans.append(found)
        return expanded, spans

    @staticmethod
    def _offsets_in_caller_text(offsets: list[tuple[int, int]], spans: list[tuple]) -> list[tuple[int, int]]:
        """Token offsets moved from the expanded text back to the caller's (a token inside an image's expansion gets
        the placeholder's span): 4.57's apply_chat_template places assistant masks with them, not knowing the text
        was expanded; 5.x corrects them itself with the replacement offsets."""

        def back(char: int, end: bool) -> int:
            shift = 0
            for old_start, old_end, new_start, new_end in spans:
                if char < new_start or (end and char == new_start):
                    break
                if char < new_end or (end and char == new_end):
                    return old_end if end else old_start
                shift = new_end - old_end
            return char - shift

        return [(back(a, False), back(b, True)) if b > a else (a, b) for a, b in offsets]


# The base of FlorenceVLProcessor, chosen once.
ProcessorBase = _Processor4x if IS_TRANSFORMERS_4 else _Processor5x


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
