"""Florence-VL: Florence-2 depth and breadth features, fused by DBFusion, projected into a causal LLM.

Reads in the paper's order: depth features (DaViT + Florence-2 projection) -> breadth features (the Florence-2
encoder over [depth ; task prompt] for each prompt) -> DBFusion (channel concatenation) -> projector -> LLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers import AutoModel, Florence2VisionBackbone, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.models.bart.modeling_bart import BartEncoder
from transformers.models.florence2.modeling_florence2 import (
    Florence2MultiModalProjector,
    Florence2VisionPositionalEmbeddingCosine1D,
)
from transformers.utils import can_return_tuple

from .compatibility_florence_vl import cached_length, keep_in_fp32_names, run_vision_tower
from .configuration_florence_vl import DEPTH_FEATURE, FlorenceVLConfig


@dataclass
class FlorenceVLModelOutputWithPast(BaseModelOutputWithPast):
    """LLM outputs plus the fused, projected image features (images, image_seq_length, hidden)."""

    image_hidden_states: Optional[torch.FloatTensor] = None


@dataclass
class FlorenceVLCausalLMOutputWithPast(ModelOutput):
    """Language-modelling outputs of Florence-VL, with the image features that were spliced in."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    past_key_values: Optional[Cache] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None
    image_hidden_states: Optional[torch.FloatTensor] = None


class FlorenceVLDBFusionProjector(nn.Module):
    """Maps channel-concatenated depth and breadth features to the LLM width (`mlpNx_gelu` of the original)."""

    def __init__(self, config: FlorenceVLConfig):
        super().__init__()
        in_features = len(config.fused_features) * config.vision_config.projection_dim
        hidden = config.text_config.hidden_size
        self.linears = nn.ModuleList(
            nn.Linear(in_features if i == 0 else hidden, hidden) for i in range(config.projector_depth)
        )
        self.act = ACT2FN[config.projector_hidden_act]

    def forward(self, fused_features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linears[0](fused_features)
        for linear in self.linears[1:]:
            hidden_states = linear(self.act(hidden_states))
        return hidden_states


class FlorenceVLPreTrainedModel(PreTrainedModel):
    """Shared loading, initialisation and device-placement settings of the Florence-VL models."""

    config_class = FlorenceVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The tower stays on one device; the LLM and BART layers add their own decoder/encoder layer classes.
    _no_split_modules = ["Florence2VisionBackbone", "BartEncoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def _keep_full_precision(self, prefix: str) -> None:
        """Declare the config's keep_in_fp32_modules (per instance, before post_init) for modules under `prefix`."""
        self._keep_in_fp32_modules = keep_in_fp32_names(self.config.keep_in_fp32_modules, prefix)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # A constant table, not a weight: 5.x builds models on the meta device, so recompute it when not loaded.
        if isinstance(module, Florence2VisionPositionalEmbeddingCosine1D):
            sine, cosine = module.get_sinusoid_embeddings(module.max_seq_len, module.embed_dim)
            table = torch.stack([sine, cosine], dim=-1).flatten(1)
            with torch.no_grad():
                module.pos_idx_to_embed.copy_(table)


class FlorenceVLModel(FlorenceVLPreTrainedModel):
    """Florence-2 vision tower, Florence-2 encoder, DBFusion projector and the bare LLM (no LM head)."""

    def __init__(self, config: FlorenceVLConfig):
        super().__init__(config)
        self._keep_full_precision(prefix="")
        self.vision_tower = Florence2VisionBackbone(config.vision_config)
        self.vision_projector = Florence2MultiModalProjector(config)
        self.breadth_encoder = BartEncoder(config.breadth_encoder_config)
        self.dbfusion_projector = FlorenceVLDBFusionProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_depth_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """The depth feature V (`pooler_output`): DaViT output with 2-D/temporal embeddings, pooled, projected,
        layer-normed; `last_hidden_state` is the DaViT grid as (images, tokens, channels)."""
        self._check_pixel_values(pixel_values)
        tower_dtype = self.vision_tower.convs[0].conv.weight.dtype
        tower = run_vision_tower(self.vision_tower, pixel_values.to(tower_dtype), **kwargs)
        grid = tower.last_hidden_state
        return BaseModelOutputWithPooling(
            last_hidden_state=grid.flatten(2).transpose(1, 2),
            pooler_output=self.vision_projector(grid),
            hidden_states=tower.hidden_states,
            attentions=tower.attentions,
        )

    def get_breadth_features(self, depth_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder states at the image positions of [V ; prompt], for every prompt, in ONE batched encoder pass."""
        tasks = self.config.breadth_prompts
        num_images, num_tokens, width = depth_features.shape
        prompt_ids = self._prompt_ids(tasks, depth_features.device)
        prompt_embeds = self.breadth_encoder.embed_tokens(prompt_ids).to(depth_features.dtype)
        inputs_embeds = torch.cat(
            [
                depth_features[:, None].expand(num_images, len(tasks), num_tokens, width),
                prompt_embeds[None].expand(num_images, *prompt_embeds.shape),
            ],
            dim=2,
        ).flatten(0, 1)
        attention_mask = None
        if not self.config.attend_prompt_padding:
            prompt_mask = (prompt_ids != self.config.breadth_encoder_config.pad_token_id).long()
            image_mask = prompt_mask.new_ones(len(tasks), num_tokens)
            attention_mask = torch.cat([image_mask, prompt_mask], dim=1).repeat(num_images, 1)
        encoded = self.breadth_encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        encoded = encoded[:, :num_tokens].unflatten(0, (num_images, len(tasks)))
        return {task: encoded[:, i] for i, task in enumerate(tasks)}

    def fuse_features(
        self, depth_features: torch.Tensor, breadth_features: Optional[dict[str, torch.Tensor]] = None
    ) -> torch.Tensor:
        """DBFusion's concatenation: the depth feature and every prompt's breadth feature (computed from the depth
        feature unless given) on channels, in the config's `fused_features` order (what the DBFusion projector reads)."""
        if breadth_features is None:
            breadth_features = self.get_breadth_features(depth_features)
        features = {DEPTH_FEATURE: depth_features, **breadth_features}
        return torch.cat([features[name] for name in self.config.fused_features], dim=-1)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """DBFusion: depth and breadth features concatenated on channels and projected to the LLM width.

        `pooler_output` holds the visual tokens that replace the placeholders, (images, image_seq_length, hidden);
        `last_hidden_state`, `hidden_states` and `attentions` are the DaViT tower's (as Florence-2 returns them).
        """
        depth = self.get_depth_features(pixel_values, **kwargs)
        depth.pooler_output = self.dbfusion_projector(self.fuse_features(depth.pooler_output))
        return depth

    def get_placeholder_mask(
        self, input_ids: Optional[torch.LongTensor], inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.BoolTensor:
        """Positions of the image placeholders, found by id (or, without ids, by the placeholder's embedding), as a
        mask broadcastable to `inputs_embeds`; ValueError unless they match the image features one to one."""
        if input_ids is None:
            placeholder = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == placeholder).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        num_tokens, num_images = int(mask.sum()), image_features.shape[0]
        if num_tokens != image_features.shape[0] * image_features.shape[1]:
            raise ValueError(
                f"Image placeholders and images do not match: the prompt holds {num_tokens} image tokens "
                f"({num_tokens / self.config.image_seq_length:g} images of {self.config.image_seq_length} tokens), "
                f"but {num_images} images were given ({num_images * self.config.image_seq_length} tokens)."
            )
        return mask[..., None].expand_as(inputs_embeds).to(inputs_embeds.device)

    def uncached_images(
        self, input_ids: torch.LongTensor, pixel_values: Optional[torch.FloatTensor], cached: int
    ) -> Optional[torch.FloatTensor]:
        """The images still to encode when the cache holds the first `cached` positions of `input_ids` (each row's
        whole sequence): in each row, the images whose placeholders lie in the cached part are its leading ones and
        are dropped (their features are in the cache); None when none is left. ValueError when a row's cache ends
        inside an image's placeholders (its features cannot be split)."""
        if pixel_values is None or cached == 0 or input_ids.shape[1] <= cached:
            return pixel_values  # no cache, or only the new ids given: `forward` sorts it out
        seq = self.config.image_seq_length
        placeholders = input_ids == self.config.image_token_id
        in_cache, totals = placeholders[:, :cached].sum(-1).tolist(), placeholders.sum(-1).tolist()
        for row, count in enumerate(in_cache):
            if count % seq:
                raise ValueError(
                    f"The cache ends inside an image's placeholders (row {row}: {count % seq} of its "
                    f"{seq} image tokens are cached): continue from a cache that ends before or after an image."
                )
        if sum(totals) != seq * pixel_values.shape[0]:
            return pixel_values  # a mismatch `get_placeholder_mask` reports
        keep, start = [], 0
        for count, total in zip(in_cache, totals):
            keep += range(start + count // seq, start + total // seq)
            start += total // seq
        return pixel_values[keep] if keep else None

    def skip_cached_images(
        self, input_ids: torch.LongTensor, pixel_values: torch.FloatTensor, past_key_values: Optional[Cache]
    ) -> Optional[torch.FloatTensor]:
        """For a forward given only the ids after its cache (one sequence) and every image of the conversation: the
        images whose placeholders are not in these ids are the leading ones, already in the cache, and are dropped."""
        seq = self.config.image_seq_length
        given = int((input_ids == self.config.image_token_id).sum())
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        if given >= seq * pixel_values.shape[0] or input_ids.shape[0] != 1 or cached == 0:
            return pixel_values  # nothing cached to skip (a mismatch `get_placeholder_mask` reports)
        if given % seq:
            raise ValueError(
                f"The cache ends inside an image's placeholders (the ids after it start with {given % seq} of an "
                f"image's {seq} tokens): continue from a cache that ends before or after an image."
            )
        return pixel_values[pixel_values.shape[0] - given // seq:] if given else None

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        **kwargs,
    ) -> FlorenceVLModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None and input_ids is not None and past_key_values is not None:
            pixel_values = self.skip_cached_images(input_ids, pixel_values, past_key_values)
        # Without pixel_values the placeholder ids are embedded as the text tokens they are (as Llava does).
        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, return_dict=True).pooler_output
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        return FlorenceVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )

    def _prompt_ids(self, tasks: list[str], device: torch.device) -> torch.LongTensor:
        """The prompts' BART ids as one (prompts, length) tensor; shorter prompts right-padded with the pad id."""
        ids = [self.config.florence_prompts[task]["input_ids"] for task in tasks]
        length = max(map(len, ids))
        pad = self.config.breadth_encoder_config.pad_token_id
        return torch.tensor([row + [pad] * (length - len(row)) for row in ids], device=device)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Reject pixel tensors the tower would turn into the wrong number of visual tokens."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        vision = self.config.vision_config
        stride = 1
        for step in vision.patch_stride:
            stride *= step
        side = round((self.config.image_seq_length - 1) ** 0.5) * stride
        expected = (vision.in_channels, side, side)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (images, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}; use the FlorenceVLProcessor to prepare images."
            )


class FlorenceVLForConditionalGeneration(FlorenceVLPreTrainedModel, GenerationMixin):
    """Florence-VL with a language-modelling head: answers questions about images with `generate`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: FlorenceVLConfig):
        super().__init__(config)
        self._keep_full_precision(prefix=f"{self.base_model_prefix}.")
        self.model = FlorenceVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def language_model(self) -> nn.Module:
        """The LLM (no head), where serving engines and common tooling look for it, as on native VLMs."""
        return self.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        """The Florence-2 DaViT tower, as on native VLMs."""
        return self.model.vision_tower

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """See `FlorenceVLModel.get_image_features`: `.pooler_output` is what replaces the placeholders."""
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs,
    ) -> Union[tuple, FlorenceVLCausalLMOutputWithPast]:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            if input_ids is not None:  # never train on the visual tokens
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return FlorenceVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> dict:
        """Send each image to the model once: the images whose placeholders the cache already holds (every image after
        the prefill; on a conversation continued from its cache, the earlier turns' ones) are not encoded again."""
        cached = cached_length(past_key_values, kwargs)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, pixel_values=pixel_values,
            attention_mask=attention_mask, **kwargs,
        )
        if model_inputs.get("pixel_values") is not None:
            model_inputs["pixel_values"] = self.model.uncached_images(input_ids, model_inputs["pixel_values"], cached)
        return model_inputs


# `save_pretrained` then copies this file and the config's next to the weights (remote code).
FlorenceVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["FlorenceVLPreTrainedModel", "FlorenceVLModel", "FlorenceVLForConditionalGeneration"]
