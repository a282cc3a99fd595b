"""Configuration of Florence-VL: Florence-2 depth/breadth features fused (DBFusion) into a causal LLM."""

from __future__ import annotations

from typing import Any, Optional, Union

from transformers import AutoConfig, BartConfig, Florence2VisionConfig, PretrainedConfig

from .compatibility_florence_vl import ConfigBase

# The three Florence-2 task prompts of the release, in release order, with the BART token ids the original
# hard-codes (right-padded to 14 with the BART pad id 1).
DEFAULT_FLORENCE_PROMPTS: dict[str, dict[str, Any]] = {
    "<DETAILED_CAPTION>": {
        "text": "Describe in detail what is shown in the image.",
        "input_ids": [0, 47066, 21700, 11, 4617, 99, 16, 2343, 11, 5, 2274, 4, 2, 1],
    },
    "<OCR>": {
        "text": "What is the text in the image?",
        "input_ids": [0, 2264, 16, 5, 2788, 11, 5, 2274, 116, 2, 1, 1, 1, 1],
    },
    "<DENSE_REGION_CAPTION>": {
        "text": "Locate the objects in the image, with their descriptions.",
        "input_ids": [0, 574, 22486, 5, 8720, 11, 5, 2274, 6, 19, 49, 24173, 4, 2],
    },
}
DEPTH_FEATURE = "depth"
# Modules (names inside FlorenceVLModel) that quantizers leave unquantized: the Florence-2 side and the DBFusion
# projector are small next to the LLM and lose the most from 8-/4-bit weights.
FULL_PRECISION_MODULES = ["vision_tower", "vision_projector", "breadth_encoder", "dbfusion_projector"]

# Florence-2-large: the tower of both releases.
FLORENCE2_LARGE_VISION = dict(
    depths=[1, 1, 9, 1],
    embed_dim=[256, 512, 1024, 2048],
    num_heads=[8, 16, 32, 64],
    num_groups=[8, 16, 32, 64],
    window_size=12,
    projection_dim=1024,
    drop_path_rate=0.0,
)
FLORENCE2_LARGE_ENCODER = dict(
    vocab_size=51289,
    d_model=1024,
    encoder_layers=12,
    encoder_attention_heads=16,
    encoder_ffn_dim=4096,
    decoder_layers=0,
    max_position_embeddings=1024,
    scale_embedding=False,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)

# The 8B release's LLM (Llama-3.1-8B-Instruct with the release's added <pad>): the default text config.
LLAMA31_8B_TEXT = dict(
    model_type="llama",
    vocab_size=128257,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
    pad_token_id=128256,
    tie_word_embeddings=False,
)
# The image placeholder of each LLM family: a reserved special token of the release tokenizer, so that its id has
# a row in the (unchanged) embedding table; the original never emits it (it splices images in at a -200 marker).
IMAGE_TOKENS = {"llama": "<|reserved_special_token_0|>", "phi3": "<|placeholder1|>"}
# Their ids in the release tokenizers (Llama-3.1, Phi-3.5), for tools that work without a tokenizer at hand.
RELEASE_IMAGE_TOKEN_IDS = {"llama": 128002, "phi3": 32002}

# The remote-code files every model folder carries (the model's code, as `trust_remote_code` loads it).
REMOTE_CODE_FILES = (
    "configuration_florence_vl.py", "modeling_florence_vl.py", "processing_florence_vl.py", "compatibility_florence_vl.py",
)

# Every Auto class a user may call on a saved folder (`AutoModelForVision2Seq` exists in transformers 4.x only).
AUTO_MAP = {
    "AutoConfig": "configuration_florence_vl.FlorenceVLConfig",
    "AutoModel": "modeling_florence_vl.FlorenceVLModel",
    "AutoModelForImageTextToText": "modeling_florence_vl.FlorenceVLForConditionalGeneration",
    "AutoModelForVision2Seq": "modeling_florence_vl.FlorenceVLForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_florence_vl.FlorenceVLForConditionalGeneration",
}

class FlorenceVLConfig(ConfigBase):
    """Configuration of [`FlorenceVLForConditionalGeneration`].

    Args:
        vision_config: the Florence-2 DaViT tower and its image projection (depth features).
        breadth_encoder_config: the Florence-2 BART text encoder that computes the breadth features (no decoder).
        text_config: the language model; any `model_type` that `AutoConfig` knows (Llama-3, Phi-3, ...). Default:
            the 8B release's Llama-3.1-8B.
        florence_prompts: task name -> {"text", "input_ids"}: the Florence-2 prompts run over each image.
            `input_ids` are BART ids, already padded as the original pads them.
        fused_features: what DBFusion concatenates on channels, in order: "depth" and/or prompt task names.
        attend_prompt_padding: whether the encoder attends the prompts' padding tokens (the original does).
        projector_depth: number of linear layers of the DBFusion projector (GELU between them).
        projector_hidden_act: activation between the projector's linear layers.
        image_token_id: id of the image placeholder token: a token of the LLM vocabulary (a row of its embedding
            table) that text never produces, e.g. a reserved special token (`IMAGE_TOKENS`).
        image_seq_length: visual tokens per image (1 global + 24x24 grid for 768x768 inputs).
        keep_in_fp32_modules: modules of the model (default: the Florence-2 side and the DBFusion projector) that
            quantizers such as bitsandbytes do not quantize, and that float16 loading keeps in float32; this is
            transformers' `_keep_in_fp32_modules`, here a config field so that a user can change it in
            `from_pretrained(..., keep_in_fp32_modules=[])`. bfloat16 loading is unaffected.
    """

    model_type = "florence_vl"
    sub_configs = {
        "vision_config": Florence2VisionConfig, "breadth_encoder_config": BartConfig, "text_config": AutoConfig,
    }
    # Tensor parallelism (vLLM, transformers' tp_plan). The LLM adds its own plan under `language_model.`. The breadth
    # encoder is split by heads like the LLM: vLLM merges its k/v projections into one column-parallel layer whatever
    # the plan says, so q and out_proj must be sharded to match (replicated, they broke TP=2). The DaViT stays replicated.
    base_model_tp_plan = {
        "breadth_encoder.layers.*.self_attn.q_proj": "colwise",
        "breadth_encoder.layers.*.self_attn.k_proj": "colwise",
        "breadth_encoder.layers.*.self_attn.v_proj": "colwise",
        "breadth_encoder.layers.*.self_attn.out_proj": "rowwise",
        "breadth_encoder.layers.*.fc1": "colwise",
        "breadth_encoder.layers.*.fc2": "rowwise",
    }

    def __init__(
        self,
        vision_config: Optional[Union[dict, Florence2VisionConfig]] = None,
        breadth_encoder_config: Optional[Union[dict, BartConfig]] = None,
        text_config: Optional[Union[dict, PretrainedConfig]] = None,
        florence_prompts: Optional[dict[str, dict[str, Any]]] = None,
        fused_features: Optional[list[str]] = None,
        attend_prompt_padding: bool = True,
        projector_depth: int = 3,
        projector_hidden_act: str = "gelu",
        image_token_id: int = RELEASE_IMAGE_TOKEN_IDS["llama"],
        image_seq_length: int = 577,
        keep_in_fp32_modules: Optional[list[str]] = None,
        tie_word_embeddings: Optional[bool] = None,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = dict(FLORENCE2_LARGE_VISION)
        if isinstance(vision_config, dict):
            vision_config = Florence2VisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        # Folders written before the rename call it `encoder_config`; transformers' generation tests take a top-level
        # attribute named `encoder*` for an encoder-decoder model, hence the new name.
        legacy_encoder_config = kwargs.pop("encoder_config", None)
        if breadth_encoder_config is None:
            breadth_encoder_config = legacy_encoder_config or dict(FLORENCE2_LARGE_ENCODER)
        if isinstance(breadth_encoder_config, dict):
            breadth_encoder_config = BartConfig(
                **{k: v for k, v in breadth_encoder_config.items() if k != "model_type"}
            )
        if text_config is None:
            text_config = dict(LLAMA31_8B_TEXT)
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)

        self.vision_config = vision_config
        self.breadth_encoder_config = breadth_encoder_config
        self.text_config = text_config
        self.florence_prompts = {k: dict(v) for k, v in (florence_prompts or DEFAULT_FLORENCE_PROMPTS).items()}
        self.fused_features = list(fused_features or [DEPTH_FEATURE, *self.florence_prompts])
        self.attend_prompt_padding = attend_prompt_padding
        self.projector_depth = projector_depth
        self.projector_hidden_act = projector_hidden_act
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.keep_in_fp32_modules = list(FULL_PRECISION_MODULES if keep_in_fp32_modules is None else keep_in_fp32_modules)
        self._validate_dbfusion()
        # Tying follows the LLM's own flag, given at the top level where transformers reads it.
        if tie_word_embeddings is None:
            tie_word_embeddings = getattr(text_config, "tie_word_embeddings", False)
        kwargs["auto_map"] = {**AUTO_MAP, **kwargs.get("auto_map", {})}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _validate_dbfusion(self) -> None:
        """Fail early, naming the culprit, on DBFusion settings the model could not build."""
        unknown = [name for name in self.fused_features if name != DEPTH_FEATURE and name not in self.florence_prompts]
        if unknown:
            raise ValueError(
                f"fused_features names {unknown}, which are neither {DEPTH_FEATURE!r} nor a key of florence_prompts "
                f"({list(self.florence_prompts)})"
            )
        if len(set(self.fused_features)) != len(self.fused_features) or not self.fused_features:
            raise ValueError(f"fused_features must be non-empty and without repeats, got {self.fused_features}")
        for task, prompt in self.florence_prompts.items():
            ids = prompt.get("input_ids")
            encoder_vocab = self.breadth_encoder_config.vocab_size
            if not ids or not all(isinstance(i, int) and 0 <= i < encoder_vocab for i in ids):
                raise ValueError(
                    f"florence_prompts[{task!r}]['input_ids'] must be a non-empty list of BART token ids below "
                    f"{encoder_vocab}, got {ids}"
                )
        vocab_size = self.text_config.vocab_size
        if not isinstance(self.image_token_id, int) or not 0 <= self.image_token_id < vocab_size:
            raise ValueError(
                f"image_token_id {self.image_token_id} is not a token of the language model (vocab_size "
                f"{vocab_size}): use a reserved special token of its tokenizer ({IMAGE_TOKENS}); folders converted "
                f"before this rule put it past the table: convert them again with convert_checkpoint.py"
            )
        if self.projector_depth < 1:
            raise ValueError(f"projector_depth must be at least 1, got {self.projector_depth}")

    @property
    def breadth_prompts(self) -> list[str]:
        """The prompt tasks that DBFusion uses, in fusion order (each runs through the encoder once per image)."""
        return [name for name in self.fused_features if name != DEPTH_FEATURE]


FlorenceVLConfig.register_for_auto_class()

__all__ = ["FlorenceVLConfig", "REMOTE_CODE_FILES"]
