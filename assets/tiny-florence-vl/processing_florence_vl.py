"""Processor of Florence-VL: transformers' stock Llava image processor (square padding, 768x768) and the LLM tokenizer.

The release's prompt lives in the chat template alone (the saved tokenizer adds no special tokens), so every client
gets the release's ids however it tokenizes the rendered chat. The call is ProcessorMixin's (4.57: the compatibility
module's copy of 5.x's)."""

import os
import warnings
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import load_image
from transformers.processing_utils import MultiModalData, ProcessingKwargs

from .compatibility_florence_vl import PilImageProcessor, ProcessorBase, pil_image_processor
from .configuration_florence_vl import IMAGE_TOKENS

DEFAULT_IMAGE_TOKEN = IMAGE_TOKENS["llama"]  # the 8B release's


class FlorenceVLProcessorKwargs(ProcessingKwargs, total=False):
    """The kwargs FlorenceVLProcessor routes per modality; a batch of prompts is padded unless the caller says not."""

    _defaults = {"text_kwargs": {"padding": True}}


def default_image_processor() -> PilImageProcessor:
    """Florence-2's preprocessing as a stock Llava image processor: pad to a centred square with the mean colour,
    768x768 bicubic (PIL's, as the original), no crop, rescale 1/255, ImageNet mean/std."""
    return PilImageProcessor(do_pad=True, size={"height": 768, "width": 768}, resample=3, do_center_crop=False,
                             crop_size={"height": 768, "width": 768}, image_mean=[0.485, 0.456, 0.406],
                             image_std=[0.229, 0.224, 0.225], do_convert_rgb=True)


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


class FlorenceVLProcessor(ProcessorBase):
    """Prepares images and (chat) text for Florence-VL exactly as the original release does.

    Args:
        image_processor: a stock Llava image processor configured as Florence-2's (`default_image_processor`).
        tokenizer: the LLM tokenizer, adding no special tokens itself (`convert_checkpoint.florence_vl_tokenizer`).
        chat_template: the Llama-3 or Phi-3.5 template of the release.
        image_token: where an image goes: a reserved special token of the tokenizer (a row of the LLM's embeddings).
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
        self.image_token, self.image_seq_length = image_token, image_seq_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        image_processor = pil_image_processor(image_processor) or default_image_processor()
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def model_input_names(self) -> list[str]:
        """What the model's forward takes from this processor's output (never token_type_ids)."""
        return ["input_ids", "attention_mask", "pixel_values"]

    def prepare_inputs_layout(self, images: Any = None, text: Any = None, videos: Any = None, audio: Any = None,
                              **kwargs) -> tuple:
        """Text as a list; images read and made RGB as the original does, then flattened (nested: one list per prompt,
        `None` or `[]` for a text-only one, checked against its prompt). Other modalities are dropped, as the mixin
        drops what a processor has no part for, with a warning unless empty (as some clients pass them)."""
        for name, value in (("videos", videos), ("audio", audio), ("audios", kwargs.get("audios"))):
            if value is not None and not (isinstance(value, (list, tuple)) and all(v is None for v in value)):
                warnings.warn(f"Florence-VL takes images and text only: the {name} given are ignored.", stacklevel=3)
        text = [text] if isinstance(text, str) else None if text is None else list(text)
        images = [images] if images is not None and not isinstance(images, (list, tuple)) else images
        if images and any(item is None or isinstance(item, (list, tuple)) for item in images):
            nested = [[] if x is None else list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
            if text is not None:
                self._check_counts([t.count(self.image_token) for t in text], [len(x) for x in nested], "per sample ")
            images = [image for item in nested for image in item]
        return [as_rgb(image) for image in images or []] or None, text, None, None

    def validate_inputs(self, images: Any = None, text: Any = None, **kwargs) -> None:
        """At least one input; text strings; every image marker of the text with exactly one image."""
        if images is None and text is None:
            raise ValueError("Pass images, text, or both.")
        if text is not None:
            if not all(isinstance(t, str) for t in text):
                raise TypeError("text must be a string or a list of strings.")
            self._check_counts(sum(t.count(self.image_token) for t in text), len(images or []))

    def _check_counts(self, markers: Any, images: Any, per: str = "") -> None:
        """ValueError naming both counts unless they are equal (totals, or lists per prompt)."""
        if markers != images:
            raise ValueError(
                f"The number of {self.image_token} tokens in the prompts should be the same as the number of images: "
                f"the text holds {markers} {self.image_token} markers {per}but {images} images {per}were given; put "
                f"'{self.image_token}\\n' where each image goes, or use apply_chat_template."
            )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """What one image's placeholder becomes: `image_seq_length` image tokens (every image is 768x768)."""
        return self.image_token * self.image_seq_length

    def _get_num_multimodal_tokens(self, image_sizes: Optional[list] = None, **kwargs) -> MultiModalData:
        """Tokens and patches per image for serving engines: `image_seq_length` tokens, 1 patch, whatever the size."""
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(num_image_tokens=[self.image_seq_length] * len(image_sizes),
                              num_image_patches=[1] * len(image_sizes))

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True,
                                        **kwargs) -> list[str]:
        """Decode generated ids (one sequence or a batch) to a list of strings, prompt and output alike."""
        if isinstance(generated_outputs, (torch.Tensor, np.ndarray)):
            generated_outputs = generated_outputs.tolist()
        if generated_outputs and isinstance(generated_outputs[0], int):
            generated_outputs = [generated_outputs]
        # The pipeline strips the prompt by matching its decoded text: decode both with identical settings.
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


FlorenceVLProcessor.register_for_auto_class()

__all__ = ["FlorenceVLProcessor", "as_rgb", "default_image_processor"]
