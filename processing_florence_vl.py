"""Processor of Florence-VL: transformers' stock Llava image processor (square padding, 768x768) and the LLM tokenizer.

The release's prompt format lives in the chat template alone: the template writes every special token (the Llama-3
template both BOS of the release's ids) and the saved tokenizer adds none itself (`convert_checkpoint.py` writes it
so), so every client gets the release's ids however it tokenizes the rendered chat.
"""

# No `from __future__ import annotations`: transformers' processor tests read `Unpack[...]` off __call__'s signature.
import os
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack

from .compatibility_florence_vl import (
    PROCESSOR_PARTS,
    PilImageProcessor,
    batch_feature,
    expand_image_tokens,
    make_loadable_by_4x,
    offsets_in_prompt,
    output_flags,
    pil_image_processor,
)
from .configuration_florence_vl import IMAGE_TOKENS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_TOKEN = IMAGE_TOKENS["llama"]  # the 8B release's


class FlorenceVLProcessorKwargs(ProcessingKwargs, total=False):
    """The kwargs FlorenceVLProcessor routes per modality; a batch of prompts is padded unless the caller says not."""

    _defaults = {"text_kwargs": {"padding": True}}


def default_image_processor() -> PilImageProcessor:
    """Florence-2's preprocessing as a stock Llava image processor: pad to a centred square with the mean colour,
    768x768 bicubic, no crop, rescale 1/255, ImageNet mean/std."""
    return PilImageProcessor(
        do_pad=True,
        size={"height": 768, "width": 768},
        resample=3,  # PIL bicubic, as the original
        do_center_crop=False,
        crop_size={"height": 768, "width": 768},  # unused (no crop)
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def as_rgb(image: Any) -> Any:
    """Paths, URLs and base64 loaded; PIL images converted to RGB as the original does (alpha dropped, not composited;
    16-bit clipped at 255 by Pillow); arrays and tensors are the stock image processor's to read."""
    if isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        shown = source if len(source) < 200 else source[:200] + "..."
        try:
            image = load_image(source)
        except ValueError as error:  # neither an existing file, nor a URL, nor base64 data
            raise FileNotFoundError(f"No image file at {shown!r} (nor is it a URL or base64 image data)") from error
        except OSError as error:  # unreadable or truncated file
            raise OSError(f"Could not read the image {shown!r}: {error}") from error
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if str(image.dtype).removeprefix("torch.").startswith(("float", "bfloat")):
            raise TypeError("Image arrays must hold 0-255 integers (uint8), as PIL images do; got floats.")
        # Greyscale (H, W): as a PIL image, which gets channels like any other.
        return as_rgb(Image.fromarray(image)) if isinstance(image, np.ndarray) and image.ndim == 2 else image
    raise TypeError(f"Unsupported image type {type(image).__name__}: pass PIL images, paths, URLs, arrays or tensors.")


class FlorenceVLProcessor(ProcessorMixin):
    """Prepares images and (chat) text for Florence-VL exactly as the original release does.

    Args:
        image_processor: a stock Llava image processor configured as Florence-2's (`default_image_processor`).
        tokenizer: the LLM tokenizer, adding no special tokens itself (`convert_checkpoint.florence_vl_tokenizer`).
        chat_template: the Llama-3 or Phi-3.5 template of the release.
        image_token: the placeholder that marks where an image goes: a reserved special token of the tokenizer, so
            that its id has a row in the LLM's embedding table.
        image_seq_length: visual tokens per image; each placeholder expands to this many image tokens.
    """

    valid_processor_kwargs = FlorenceVLProcessorKwargs

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Optional[str] = None,
                 image_token: str = DEFAULT_IMAGE_TOKEN, image_seq_length: int = 577, **kwargs):
        if tokenizer is None:
            raise ValueError("FlorenceVLProcessor needs a tokenizer.")
        if image_token not in tokenizer.get_vocab():
            raise ValueError(
                f"The image token {image_token!r} is not a token of this tokenizer: pass image_token= one of its "
                f"reserved special tokens (Llama-3: <|reserved_special_token_0|>, Phi-3.5: <|placeholder1|>)."
            )
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_seq_length = image_seq_length
        image_processor = pil_image_processor(image_processor) or default_image_processor()
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def model_input_names(self) -> list[str]:
        """What the model's forward takes from this processor's output (never token_type_ids)."""
        return ["input_ids", "attention_mask", "pixel_values"]

    def __call__(
        self, images: Any = None, text: Union[str, list[str], None] = None, **kwargs: Unpack[FlorenceVLProcessorKwargs]
    ) -> BatchFeature:
        """Tokenize `text` (each image token expanded to `image_seq_length` of them) and preprocess `images`.

        `images` is flat (one list for the whole batch) or nested (one list per prompt, `None` or `[]` for a
        text-only prompt). Empty `videos`/`audio`/`audios`, as some clients pass, are accepted and ignored.
        """
        for name in ("videos", "audio", "audios"):
            value = kwargs.pop(name, None)
            if value is not None and not (isinstance(value, (list, tuple)) and all(v is None for v in value)):
                raise ValueError(f"Florence-VL takes images and text only: got {name}.")
        if images is None and text is None:
            raise ValueError("Pass images, text, or both.")
        merged = self._merge_kwargs(FlorenceVLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, image_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        # A common kwarg: _merge_kwargs puts it in both; the tensors are built once, at the end.
        return_tensors = image_kwargs.pop("return_tensors", None)
        return_tensors = text_kwargs.pop("return_tensors", None) or return_tensors
        return_mm_token_type_ids, return_offsets = output_flags(merged, kwargs)

        per_sample = self._images_per_sample(images)
        flat_images = [as_rgb(image) for sample in per_sample for image in sample]
        data: dict[str, Any] = {}
        if flat_images:
            if all(isinstance(image, Image.Image) for image in flat_images):
                # Known layout: 4.57 otherwise guesses the channel axis of a 1x1 image wrongly.
                image_kwargs.setdefault("input_data_format", "channels_last")
            data.update(self.image_processor(flat_images, return_tensors=return_tensors, **image_kwargs))

        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise TypeError("text must be a string or a list of strings.")
            self._check_image_counts(texts, per_sample, nested=self._is_nested(images))
            replacements = [self.replace_image_token(data, index) for index in range(len(flat_images))]
            expanded, offsets = expand_image_tokens(self, texts, replacements, return_offsets)
            encoding = self.tokenizer(expanded, return_token_type_ids=False, **text_kwargs)
            self._check_images_intact(texts, encoding["input_ids"], text_kwargs.get("max_length"))
            if "offset_mapping" in encoding:
                encoding["offset_mapping"] = offsets_in_prompt(
                    encoding["offset_mapping"], texts, self.image_token, self.replace_image_token({}, 0)
                )
            data.update(encoding)
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in ids] for ids in data["input_ids"]]
            if return_offsets:
                data["text_replacement_offsets"] = offsets
        return batch_feature(data, return_tensors)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """What one image's placeholder becomes: `image_seq_length` image tokens (every image is 768x768)."""
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
        return isinstance(images, (list, tuple)) and any(item is None or isinstance(item, (list, tuple)) for item in images)

    @classmethod
    def _images_per_sample(cls, images: Any) -> list[list[Any]]:
        """Images as one list per sample (nested input; None is a text-only sample), or one list of all (flat)."""
        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            return [[images]]
        if cls._is_nested(images):
            return [[] if sample is None else list(sample) if isinstance(sample, (list, tuple)) else [sample]
                    for sample in images]
        return [list(images)]

    def _check_image_counts(self, texts: list[str], per_sample: list[list[Any]], nested: bool) -> None:
        """ValueError, naming both counts, unless every image token (marker) in the text has exactly one image."""
        markers = [t.count(self.image_token) for t in texts]
        rule = f"The number of {self.image_token} tokens in the prompts should be the same as the number of images"
        if nested:
            counts = [len(sample) for sample in per_sample]
            if counts != markers:
                raise ValueError(
                    f"{rule}: the text holds {markers} {self.image_token} markers per sample but {counts} images per "
                    f"sample were given; each marker needs exactly one image."
                )
        elif sum(markers) != sum(len(sample) for sample in per_sample):
            raise ValueError(
                f"{rule}: the text holds {sum(markers)} {self.image_token} markers but "
                f"{sum(len(sample) for sample in per_sample)} images were given; each marker needs exactly one image "
                f"(put '{self.image_token}\\n' where an image goes, or use apply_chat_template)."
            )

    def _check_images_intact(self, texts: list[str], input_ids: list[list[int]], max_length: Optional[int]) -> None:
        """ValueError if truncation cut into an image's tokens: only text may be truncated, never half an image."""
        for text, ids in zip(texts, input_ids):
            expected = text.count(self.image_token) * self.image_seq_length
            found = list(ids).count(self.image_token_id)
            if found != expected:
                raise ValueError(
                    f"Truncation to max_length={max_length} cut through the images: {found} of {expected} image "
                    f"tokens left ({self.image_seq_length} per image). Raise max_length or send fewer images."
                )

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

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs) -> Any:
        """Save, then rewrite the few fields transformers 5.x writes that 4.57 cannot read."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        make_loadable_by_4x(str(save_directory))
        return result


for _name, _value in PROCESSOR_PARTS.items():
    setattr(FlorenceVLProcessor, _name, _value)
FlorenceVLProcessor.register_for_auto_class()

__all__ = ["FlorenceVLProcessor", "as_rgb", "default_image_processor"]
