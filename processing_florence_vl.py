"""Processor of Florence-VL: the original image preprocessing (square padding, 768x768) and chat prompts."""

import contextvars
import json
import os
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import logging

try:  # transformers 5.x: the PIL backend has its own class; plain `CLIPImageProcessor` is torchvision-based there.
    from transformers import CLIPImageProcessorPil as _PinnedImageProcessor
except ImportError:  # transformers 4.x: `CLIPImageProcessor` is the slow (PIL/numpy) one.
    from transformers import CLIPImageProcessor as _PinnedImageProcessor


logger = logging.get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The image-processor settings kept when another backend is swapped for the pinned one.
_PINNED_SETTINGS = (
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
    "do_convert_rgb", "do_center_crop", "crop_size",
)
DEFAULT_IMAGE_TOKEN = "<|reserved_special_token_0|>"  # Llama-3's first reserved token (the 8B release's LLM)


class FlorenceVLImagesKwargs(ImagesKwargs, total=False):
    """Image options: the image processor's, plus `do_pad_square` (the original pads to a centred square)."""

    do_pad_square: bool


class FlorenceVLProcessorKwargs(ProcessingKwargs, total=False):
    """The kwargs FlorenceVLProcessor routes, per modality, with transformers' `_merge_kwargs`."""

    images_kwargs: FlorenceVLImagesKwargs
    _defaults = {}  # transformers 4.x reads it; 5.x's defaults are processor class attributes (none needed here)


# Set while `apply_chat_template` tokenizes, to undo ProcessorMixin forcing `add_special_tokens=False` (see there).
_CHAT_ADD_SPECIAL_TOKENS: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar(
    "florence_vl_chat_add_special_tokens", default=None
)


def default_image_processor() -> "_PinnedImageProcessor":
    """Florence-2's image processor: 768x768 bicubic, no crop, rescale 1/255, ImageNet mean/std (PIL backend)."""
    return _PinnedImageProcessor(
        do_resize=True,
        size={"height": 768, "width": 768},
        resample=3,  # PIL bicubic, as the original
        do_center_crop=False,
        crop_size={"height": 768, "width": 768},  # unused (no crop); saved for clarity
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def to_rgb_pil(image: Any) -> Image.Image:
    """Any supported image (PIL of any mode, path/URL/base64 string, numpy HWC/CHW, torch CHW/HWC) as an RGB PIL image."""
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        image = _load(image)
    elif isinstance(image, torch.Tensor):
        image = _array_to_pil(image.detach().cpu().numpy(), channels_first_default=True)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, channels_first_default=False)
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"Unsupported image type {type(image).__name__}: pass PIL images, paths, URLs, numpy arrays or tensors."
        )
    # The original calls convert("RGB") for every mode (alpha dropped, I;16 clipped at 255 by Pillow); kept for parity.
    return image if image.mode == "RGB" else image.convert("RGB")


def _load(source: str) -> Image.Image:
    """transformers' loader (local paths, http(s) URLs, base64), with errors that name the source."""
    shown = source if len(source) < 200 else source[:200] + "..."
    try:
        return load_image(source)
    except ValueError as error:  # neither an existing file, nor a URL, nor base64 data
        raise FileNotFoundError(f"No image file at {shown!r} (nor is it a URL or base64 image data)") from error
    except OSError as error:  # unreadable or truncated file
        raise OSError(f"Could not read the image {shown!r}: {error}") from error


def _array_to_pil(array: np.ndarray, channels_first_default: bool) -> Image.Image:
    """An (H, W), (H, W, C) or (C, H, W) array as a PIL image; floats are read as values in [0, 1]."""
    if array.ndim == 3:
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        # Torch tensors are usually CHW and numpy arrays HWC; only the unambiguous case overrides that habit.
        if first and (channels_first_default or not last):
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"An image array must have 2 or 3 dimensions, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint16:
        array = array.astype(np.uint8)
    return Image.fromarray(array)


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad to a square with `background`, the image centred at offset (long - short) // 2, as the original does."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def _is_image_like(value: Any) -> bool:
    return isinstance(value, (Image.Image, np.ndarray, torch.Tensor, str, os.PathLike))


class FlorenceVLProcessor(ProcessorMixin):
    """Prepares images and (chat) text for Florence-VL exactly as the original release does.

    Args:
        image_processor: a CLIP image processor configured as Florence-2's (see `default_image_processor`).
        tokenizer: the LLM tokenizer.
        chat_template: the Llama-3 or Phi-3 template of the original release.
        image_token: the placeholder that marks where an image goes in the text: a (reserved) special token of the
            tokenizer, so that its id has a row in the LLM's embedding table.
        image_seq_length: visual tokens per image; each placeholder expands to this many image tokens.
    """

    valid_processor_kwargs = FlorenceVLProcessorKwargs

    if _PinnedImageProcessor.__name__ == "CLIPImageProcessor":
        # transformers 4.x needs these declared; 5.x infers them from __init__ and warns that they are deprecated.
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: Optional[str] = None,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        image_seq_length: int = 577,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("FlorenceVLProcessor needs a tokenizer.")
        image_processor = self._pinned(image_processor)
        if image_token not in tokenizer.get_vocab():
            raise ValueError(
                f"The image token {image_token!r} is not a token of this tokenizer: pass image_token= one of its "
                f"reserved special tokens (Llama-3: <|reserved_special_token_0|>, Phi-3.5: <|placeholder1|>)."
            )
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_seq_length = image_seq_length
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @staticmethod
    def _pinned(image_processor: Any) -> "_PinnedImageProcessor":
        """The PIL-backend CLIP image processor (the only backend measured to match the original bit for bit)."""
        if image_processor is None:
            return default_image_processor()
        if type(image_processor) is _PinnedImageProcessor:
            return image_processor
        # e.g. a torchvision "fast" processor that AutoImageProcessor picked: keep the settings, swap the backend.
        settings = {k: getattr(image_processor, k) for k in _PINNED_SETTINGS if hasattr(image_processor, k)}
        for key in ("size", "crop_size"):
            value = settings.get(key)
            if value is not None and not isinstance(value, dict):  # e.g. 5.x SizeDict
                fields = ("height", "width", "shortest_edge", "longest_edge")
                settings[key] = {f: getattr(value, f) for f in fields if getattr(value, f, None) is not None}
        resample = settings.get("resample")
        if resample is not None and not isinstance(resample, int):
            settings["resample"] = int(getattr(resample, "value", 3))
        return _PinnedImageProcessor(**settings)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The square-padding colour: the image mean in 0..255, truncated, as the original computes it."""
        return tuple(int(x * 255) for x in self.image_processor.image_mean)

    @property
    def model_input_names(self) -> list[str]:
        """What the model's forward takes from this processor's output (never token_type_ids)."""
        return ["input_ids", "attention_mask", "pixel_values"]

    # ------------------------------------------------------------------ images
    def preprocess_images(
        self, images: list[Any], return_tensors: Optional[str] = None, **image_kwargs
    ) -> BatchFeature:
        """Convert to RGB, pad to a centred square with the mean colour, then resize/rescale/normalise."""
        do_pad_square = image_kwargs.pop("do_pad_square", True)
        pil_images = [to_rgb_pil(image) for image in images]
        if do_pad_square:
            pil_images = [expand_to_square(image, self.pad_color) for image in pil_images]
        # channels_last: transformers 4.57 guesses the channel axis of tiny (1x1) images wrongly otherwise.
        return self.image_processor(
            pil_images, return_tensors=return_tensors, input_data_format="channels_last", **image_kwargs
        )

    # ------------------------------------------------------------------ main call
    def __call__(
        self, images: Any = None, text: Union[str, list[str], None] = None, **kwargs: Unpack[FlorenceVLProcessorKwargs]
    ) -> BatchFeature:
        """Tokenise `text` (each image token expanded to `image_seq_length` of them) and preprocess `images`.

        kwargs are routed per modality by transformers' `_merge_kwargs` (flat, or as `text_kwargs` /
        `images_kwargs`); `return_mm_token_type_ids` marks image tokens with 1, and `return_text_replacement_offsets`
        (transformers 5.x) reports where each image's tokens went in the text.
        """
        if kwargs.get("videos") is not None or kwargs.get("audio") is not None:
            raise ValueError("Florence-VL takes images and text only, not videos or audio.")
        if images is None and text is None:
            raise ValueError("Pass images, text, or both.")
        merged = self._merge_kwargs(
            FlorenceVLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs, image_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = image_kwargs.pop("return_tensors", None)  # a common kwarg: in both
        return_tensors = text_kwargs.pop("return_tensors", None) or return_tensors
        # 5.x routes these two to the top level; 4.x routes the first to text_kwargs and drops the second.
        return_mm_token_type_ids, return_offsets = (
            text_kwargs.pop(key, merged.get(key, kwargs.get(key)))
            for key in ("return_mm_token_type_ids", "return_text_replacement_offsets")
        )

        per_sample_images = self._images_per_sample(images)
        flat_images = [image for sample in per_sample_images for image in sample]
        data: dict[str, Any] = {}
        if flat_images:
            data.update(self.preprocess_images(flat_images, return_tensors=return_tensors, **image_kwargs))

        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise TypeError("text must be a string or a list of strings.")
            self._check_image_counts(texts, per_sample_images, nested=self._is_nested(images))
            self._apply_text_defaults(text_kwargs, kwargs, batched=len(texts) > 1)
            replacements = [self.replace_image_token(data, index) for index in range(len(flat_images))]
            expanded, offsets = _expand_image_tokens(self, texts, replacements, return_offsets)
            encoding = self.tokenizer(expanded, return_token_type_ids=False, **text_kwargs)
            encoding.pop("token_type_ids", None)  # the models' generate rejects them (4.57 and 5.x)
            self._check_images_intact(texts, encoding["input_ids"], text_kwargs.get("max_length"))
            data.update(encoding)
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in ids] for ids in data["input_ids"]]
            if return_offsets:
                data["text_replacement_offsets"] = offsets
        if "text_replacement_offsets" in data:  # a list of dicts, never a tensor (5.x's BatchFeature knows)
            return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _apply_text_defaults(self, text_kwargs: dict[str, Any], passed: dict[str, Any], batched: bool) -> None:
        """Batched prompts: pad, on the left (generation continues on the right), unless the caller chose."""
        chat_add_special_tokens = _CHAT_ADD_SPECIAL_TOKENS.get()
        if chat_add_special_tokens is not None:
            text_kwargs["add_special_tokens"] = chat_add_special_tokens
        if batched:
            chosen = {**passed, **(passed.get("text_kwargs") or {})}
            if "padding" not in chosen:
                text_kwargs["padding"] = True
            if "padding_side" not in chosen:
                text_kwargs["padding_side"] = "left"

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """What one image's placeholder becomes in the text: `image_seq_length` image tokens (always 577 for the
        releases: every image is resized to 768x768)."""
        return self.image_token * self.image_seq_length

    def _get_num_multimodal_tokens(self, image_sizes: Optional[list] = None, **kwargs) -> MultiModalData:
        """Tokens and patches per image for serving engines: `image_seq_length` tokens, 1 patch, whatever the size."""
        data = {}
        if image_sizes is not None:
            data = {"num_image_tokens": [self.image_seq_length] * len(image_sizes),
                    "num_image_patches": [1] * len(image_sizes)}
        return MultiModalData(**data)

    @staticmethod
    def _is_nested(images: Any) -> bool:
        return isinstance(images, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in images)

    @classmethod
    def _images_per_sample(cls, images: Any) -> list[list[Any]]:
        """Images as one list per sample (nested input), or a single list holding all of them (flat input)."""
        if images is None:
            return []
        if _is_image_like(images):
            return [[images]]
        if isinstance(images, (list, tuple)):
            if cls._is_nested(images):
                return [list(sample) if isinstance(sample, (list, tuple)) else [sample] for sample in images]
            return [list(images)]
        raise TypeError(f"Unsupported images argument of type {type(images).__name__}")

    def _check_image_counts(self, texts: list[str], per_sample: list[list[Any]], nested: bool) -> None:
        """ValueError, naming both counts, unless every image token (marker) in the text has exactly one image."""
        markers = [t.count(self.image_token) for t in texts]
        rule = f"The number of {self.image_token} tokens in the prompts should be the same as the number of images"
        if nested:
            counts = [len(sample) for sample in per_sample]
            if len(counts) != len(markers) or counts != markers:
                raise ValueError(
                    f"{rule}: the text holds {markers} {self.image_token} markers per sample but {counts} images per "
                    f"sample were given; each marker needs exactly one image."
                )
            return
        num_images = sum(len(sample) for sample in per_sample)
        if sum(markers) != num_images:
            raise ValueError(
                f"{rule}: the text holds {sum(markers)} {self.image_token} markers but {num_images} images were "
                f"given; each marker needs exactly one image (put '{self.image_token}\\n' where an image goes, or "
                f"use apply_chat_template)."
            )

    def _check_images_intact(self, texts: list[str], input_ids: list[list[int]], max_length: Optional[int]) -> None:
        """ValueError if truncation cut into an image's tokens: only text may be truncated, never half an image."""
        for text, ids in zip(texts, input_ids):
            expected = text.count(self.image_token) * self.image_seq_length
            found = ids.count(self.image_token_id)
            if found != expected:
                raise ValueError(
                    f"Truncation to max_length={max_length} cut through the images: {found} of {expected} image "
                    f"tokens left ({self.image_seq_length} per image). Raise max_length or send fewer images."
                )

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, conversation: Any, chat_template: Optional[str] = None, **kwargs) -> Any:
        """Render (and optionally tokenise) chats; the tokenizer still adds its BOS, as in the original."""
        # ProcessorMixin tokenises with add_special_tokens=False when the prompt starts with the BOS text. The
        # original tokenises the Llama-3 prompt (which starts with <|begin_of_text|>) WITH the tokenizer's BOS, so
        # its ids start with two BOS; training used the same ids. Restore that unless the caller chose otherwise.
        processor_kwargs = kwargs.get("processor_kwargs") or {}
        explicit = kwargs.get("add_special_tokens", processor_kwargs.get("add_special_tokens"))
        token = _CHAT_ADD_SPECIAL_TOKENS.set(True if explicit is None else bool(explicit))
        try:
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        finally:
            _CHAT_ADD_SPECIAL_TOKENS.reset(token)

    # ------------------------------------------------------------------ decoding
    def post_process_image_text_to_text(
        self, generated_outputs: Any, skip_special_tokens: bool = True, **kwargs
    ) -> list[str]:
        """Decode generated ids (one sequence or a batch) to a list of strings, prompt and output alike."""
        if isinstance(generated_outputs, (torch.Tensor, np.ndarray)):
            generated_outputs = generated_outputs.tolist()
        if generated_outputs and isinstance(generated_outputs[0], int):
            generated_outputs = [generated_outputs]
        # The pipeline strips the prompt by matching its decoded text: decode both with identical settings.
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs) -> Any:
        """Save, then rewrite the few fields transformers 5.x writes that 4.57 cannot read."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        _make_loadable_by_4x(str(save_directory), self.image_processor)
        return result


def _expand_image_tokens(
    processor: FlorenceVLProcessor, texts: list[str], replacements: list[str], return_offsets: bool
) -> tuple[list[str], Optional[list]]:
    """Each image token replaced by its image's replacement text, with transformers 5.x's replacement offsets."""
    if hasattr(processor, "get_text_with_replacements"):  # transformers 5.x
        if not replacements:
            return texts, [[] for _ in texts]
        return processor.get_text_with_replacements(list(texts), replacements)
    # transformers 4.x: every image expands alike; 4.x has no offsets protocol.
    if return_offsets:
        raise ValueError("return_text_replacement_offsets needs transformers 5.x.")
    return [t.replace(processor.image_token, processor.replace_image_token({}, 0)) for t in texts], None


def _make_loadable_by_4x(folder: str, image_processor: Any) -> None:
    """Rewrite 5.x-only fields of the saved tokenizer/processor files into forms both 4.57 and 5.x read."""
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):
        with open(tokenizer_config, encoding="utf-8") as f:
            config = json.load(f)
        changed = False
        if config.get("tokenizer_class") in ("TokenizersBackend", None):
            # 5.x's generic name for a tokenizer.json-backed tokenizer; 4.57 knows it as PreTrainedTokenizerFast.
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            changed = True
        extra = config.get("extra_special_tokens")
        if isinstance(extra, list):
            # 4.57 wants a dict here; the list form is the old `additional_special_tokens`, which both read.
            config.pop("extra_special_tokens")
            config["additional_special_tokens"] = extra
            changed = True
        if changed:
            with open(tokenizer_config, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
                f.write("\n")

    # 5.x keeps the image processor inside processor_config.json; 4.57 reads it from preprocessor_config.json.
    processor_config = os.path.join(folder, "processor_config.json")
    preprocessor_config = os.path.join(folder, "preprocessor_config.json")
    nested = None
    if os.path.isfile(processor_config):
        with open(processor_config, encoding="utf-8") as f:
            config = json.load(f)
        nested = config.pop("image_processor", None)
        if nested is not None:
            with open(processor_config, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
    if nested is not None or os.path.isfile(preprocessor_config):
        if nested is None:
            with open(preprocessor_config, encoding="utf-8") as f:
                nested = json.load(f)
        # Both versions resolve this name (4.57: the PIL class; 5.x: a backend the processor re-pins to PIL).
        nested["image_processor_type"] = "CLIPImageProcessor"
        nested.pop("backend", None)
        with open(preprocessor_config, "w", encoding="utf-8") as f:
            json.dump(nested, f, indent=2, sort_keys=True)
            f.write("\n")


FlorenceVLProcessor.register_for_auto_class()

__all__ = ["FlorenceVLProcessor", "default_image_processor", "expand_to_square", "to_rgb_pil"]
