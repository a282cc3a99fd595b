"""FlorenceVLConfig: defaults of the release, validation, and save/reload with every field intact."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TEXT, tiny_config

from florence_vl.compatibility_florence_vl import rope_settings
from florence_vl.configuration_florence_vl import DEFAULT_FLORENCE_PROMPTS, FlorenceVLConfig

LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def rope_of(text_config) -> tuple:
    """(theta, scaling type, factor), however this transformers version stores rope settings."""
    rope = rope_settings(text_config)
    return rope["rope_theta"], rope["rope_type"], rope.get("factor")


def test_defaults_are_the_release_settings():
    config = FlorenceVLConfig()
    assert config.fused_features == ["depth", "<DETAILED_CAPTION>", "<OCR>", "<DENSE_REGION_CAPTION>"]
    assert config.breadth_prompts == ["<DETAILED_CAPTION>", "<OCR>", "<DENSE_REGION_CAPTION>"]
    assert config.florence_prompts["<OCR>"]["input_ids"] == [0, 2264, 16, 5, 2788, 11, 5, 2274, 116, 2, 1, 1, 1, 1]
    assert all(len(p["input_ids"]) == 14 for p in config.florence_prompts.values())
    assert config.attend_prompt_padding is True
    assert config.projector_depth == 3 and config.projector_hidden_act == "gelu"
    assert config.image_seq_length == 577
    # The 8B release's Llama-3.1 and its first reserved token as the image token (a row of the embedding table).
    assert (config.text_config.vocab_size, config.text_config.hidden_size) == (128257, 4096)
    assert config.image_token_id == 128002 < config.text_config.vocab_size
    assert config.vision_config.embed_dim == [256, 512, 1024, 2048]
    assert config.vision_config.projection_dim == 1024
    assert (config.breadth_encoder_config.d_model, config.breadth_encoder_config.encoder_layers) == (1024, 12)
    assert config.breadth_encoder_config.vocab_size == 51289


def test_saved_config_carries_auto_map_for_every_auto_class(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    model_class = "modeling_florence_vl.FlorenceVLForConditionalGeneration"
    assert auto_map["AutoConfig"] == "configuration_florence_vl.FlorenceVLConfig"
    for auto_class in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        assert auto_map[auto_class] == model_class


@pytest.mark.parametrize("llm", ["llama", "phi3"])
def test_round_trip_keeps_every_field(tmp_path, llm):
    config = tiny_config(
        llm,
        fused_features=["<OCR>", "depth"],
        attend_prompt_padding=False,
        projector_depth=2,
        projector_hidden_act="relu",
    )
    config.save_pretrained(tmp_path)
    reloaded = FlorenceVLConfig.from_pretrained(tmp_path)
    assert reloaded.fused_features == ["<OCR>", "depth"]
    assert reloaded.florence_prompts == DEFAULT_FLORENCE_PROMPTS
    assert (reloaded.attend_prompt_padding, reloaded.projector_depth) == (False, 2)
    assert reloaded.projector_hidden_act == "relu"
    assert reloaded.image_token_id == config.image_token_id
    assert reloaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert reloaded.breadth_encoder_config.to_dict() == config.breadth_encoder_config.to_dict()
    assert reloaded.text_config.model_type == TINY_TEXT[llm]["model_type"]
    assert reloaded.text_config.hidden_size == TINY_TEXT[llm]["hidden_size"]
    assert reloaded.text_config.rms_norm_eps == config.text_config.rms_norm_eps
    assert rope_of(reloaded.text_config) == rope_of(config.text_config)


def test_llama31_rope_scaling_survives_save(tmp_path):
    text = dict(TINY_TEXT["llama"], rope_scaling=LLAMA31_ROPE, max_position_embeddings=131072)
    config = FlorenceVLConfig(text_config=text, image_token_id=5)
    assert rope_of(config.text_config) == (500000.0, "llama3", 8.0)
    config.save_pretrained(tmp_path)
    saved_text = json.loads((tmp_path / "config.json").read_text())["text_config"]
    # The keys transformers 4.57 reads must be present whichever version wrote the file.
    assert saved_text["rope_theta"] == 500000.0
    assert saved_text["rope_scaling"]["rope_type"] == "llama3"
    assert rope_of(FlorenceVLConfig.from_pretrained(tmp_path).text_config) == (500000.0, "llama3", 8.0)


def test_phi35_longrope_survives_save(tmp_path):
    config = tiny_config("phi3")
    config.save_pretrained(tmp_path)
    saved_text = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert saved_text["rope_scaling"]["type"] == "longrope"
    assert saved_text["rope_scaling"]["long_factor"] == [1.5] * 8
    assert saved_text["original_max_position_embeddings"] == 1024
    reloaded = FlorenceVLConfig.from_pretrained(tmp_path).text_config
    assert rope_of(reloaded)[1] == "longrope"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fused_features=["depth", "<CAPTION>"]), "<CAPTION>"),
        (dict(fused_features=["depth", "depth"]), "repeats"),
        (dict(florence_prompts={"<X>": {"text": "x", "input_ids": [0, 99999999]}}), "<X>"),
        (dict(florence_prompts={"<X>": {"text": "x", "input_ids": []}}), "<X>"),
        (dict(projector_depth=0), "projector_depth"),
    ],
)
def test_invalid_dbfusion_settings_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_folders_saved_before_the_rename_load(tmp_path):
    """`encoder_config` was the breadth encoder's key before it became `breadth_encoder_config`."""
    config = tiny_config()
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["encoder_config"] = data.pop("breadth_encoder_config")
    data["encoder_config"]["encoder_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    reloaded = FlorenceVLConfig.from_pretrained(tmp_path)
    assert reloaded.breadth_encoder_config.encoder_layers == 3
    assert "encoder_config" not in reloaded.to_dict()


def test_no_top_level_attribute_reads_as_an_encoder_decoder_model():
    """transformers' generation tests treat a config with a top-level `encoder*` attribute as encoder-decoder and skip
    the left-padding and inputs_embeds tests."""
    from transformers import PretrainedConfig

    base = PretrainedConfig().to_dict()  # 4.57's base config has `encoder_no_repeat_ngram_size`: not our side
    assert not [name for name in tiny_config().to_dict() if name.startswith("encoder") and name not in base]
