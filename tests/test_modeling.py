"""The forward pass: visual tokens in the right places, the loss, DBFusion settings, attention backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from florence_vl.compatibility_florence_vl import IS_TRANSFORMERS_4
from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration

SEQ = 577


def build(llm: str = "llama", dtype: torch.dtype = torch.float64, **overrides) -> FlorenceVLForConditionalGeneration:
    """A seeded tiny model in eval mode."""
    torch.manual_seed(0)
    return FlorenceVLForConditionalGeneration(tiny_config(llm, **overrides)).to(dtype).eval()


def prompt(model, *segments) -> torch.LongTensor:
    """Token ids from segments: an int n adds n random text ids, the string "image" one image's placeholders."""
    generator = torch.Generator().manual_seed(len(segments))
    parts = [
        torch.full((SEQ,), model.config.image_token_id)
        if segment == "image"
        else torch.randint(9, model.config.text_config.vocab_size, (segment,), generator=generator)
        for segment in segments
    ]
    return torch.cat(parts)[None]


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 768, 768, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def model() -> FlorenceVLForConditionalGeneration:
    return build()


def test_image_features_are_the_projected_dbfusion_of_each_image_alone(model):
    """One row per visual token; each image's rows are its own (a batch of two equals each alone) and are the
    projector (linear, GELU, linear, GELU, linear) applied to [depth ; breadth of each prompt] in config order."""
    pixel_values = images(2)
    with torch.no_grad():
        features = model.get_image_features(pixel_values).pooler_output
        alone = [model.get_image_features(pixel_values[i : i + 1]).pooler_output[0] for i in range(2)]
        depth = model.model.get_depth_features(pixel_values).pooler_output
        breadth = model.model.get_breadth_features(depth)
        hidden = torch.cat([depth, *(breadth[task] for task in model.config.breadth_prompts)], dim=-1)
        assert hidden.shape[-1] == len(model.config.fused_features) * model.config.vision_config.projection_dim
        linears = model.model.dbfusion_projector.linears
        for i, linear in enumerate(linears):
            hidden = hidden @ linear.weight.T + linear.bias
            hidden = F.gelu(hidden) if i < len(linears) - 1 else hidden
    assert features.shape == (2, SEQ, model.config.text_config.hidden_size)
    torch.testing.assert_close(features[0], alone[0])
    torch.testing.assert_close(features[1], alone[1])
    assert (features[0] - features[1]).abs().max() > 1e-3  # two images, two feature sets
    torch.testing.assert_close(features, hidden)


def test_visual_tokens_replace_placeholders_in_order(model):
    input_ids = prompt(model, 3, "image", 4, "image", 2)
    pixel_values = images(2)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
        expected = model.get_image_features(pixel_values).pooler_output
    embeddings = out.hidden_states[0][0]  # the LLM's input embeddings
    torch.testing.assert_close(embeddings[3 : 3 + SEQ], expected[0])
    torch.testing.assert_close(embeddings[7 + SEQ : 7 + 2 * SEQ], expected[1])
    text_positions = input_ids[0] != model.config.image_token_id
    torch.testing.assert_close(embeddings[text_positions], model.get_input_embeddings()(input_ids[0][text_positions]))
    torch.testing.assert_close(out.image_hidden_states, expected)


def test_text_only_prompt_is_the_llm_alone(model):
    input_ids = prompt(model, 12)
    with torch.no_grad():
        out = model(input_ids=input_ids)
        bare = model.lm_head(model.model.language_model(input_ids=input_ids).last_hidden_state)
    assert out.logits.shape == (1, 12, model.config.text_config.vocab_size)
    torch.testing.assert_close(out.logits, bare)
    assert out.image_hidden_states is None


def test_loss_is_cross_entropy_over_text_positions(model):
    input_ids = prompt(model, 5, "image", 6)
    labels = input_ids.clone()
    labels[0, -2] = -100  # an ignored text position
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=images(1), labels=labels)
    logits, targets = out.logits[0, :-1], labels[0, 1:]
    keep = (targets != -100) & (targets != model.config.image_token_id)
    assert int(keep.sum()) == (5 - 1) + (6 - 1)  # targets inside the image block and the -100 drop out
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected.float())  # transformers computes the loss in float32


def test_tuple_output_when_return_dict_is_false(model):
    input_ids, pixel_values = prompt(model, 2, "image", 2), images(1)
    labels = input_ids.masked_fill(input_ids == model.config.image_token_id, -100)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels, return_dict=False)
        named = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], named.loss)  # loss first, then the logits, as transformers orders them
    torch.testing.assert_close(out[1], named.logits)


def test_inputs_embeds_give_the_same_logits(model):
    input_ids = prompt(model, 3, "image", 3)
    pixel_values = images(1)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
        from_embeds = model(inputs_embeds=out.hidden_states[0])
    torch.testing.assert_close(from_embeds.logits, out.logits)


@pytest.mark.parametrize("tokens, count", [(["image"], 2), (["image", 2, "image"], 1), ([], 1)])
def test_placeholder_image_mismatch_names_both_counts(model, tokens, count):
    input_ids = prompt(model, 2, *tokens, 2)
    given = tokens.count("image") * SEQ
    with pytest.raises(ValueError, match=rf"{given} image tokens.*{count} images were given"):
        model(input_ids=input_ids, pixel_values=images(count))


def test_placeholders_without_pixel_values_are_plain_tokens(model):
    """As on native VLMs (transformers' common tests rely on it): without images the ids are embedded as they are."""
    input_ids = prompt(model, 2, "image")
    with torch.no_grad():
        out = model(input_ids=input_ids)
        plain = model(inputs_embeds=model.get_input_embeddings()(input_ids))
    torch.testing.assert_close(out.logits, plain.logits)


@pytest.mark.parametrize("shape", [(1, 3, 384, 384), (1, 1, 768, 768), (3, 768, 768)])
def test_pixel_values_of_the_wrong_shape(model, shape):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(images, 3, 768, 768\)"):
        model(input_ids=prompt(model, 2, "image"), pixel_values=torch.zeros(shape, dtype=torch.float64))


def test_pixel_values_with_inputs_embeds_find_the_placeholders_by_embedding(model):
    input_ids = prompt(model, 3, "image", 3)
    embeds = model.get_input_embeddings()(input_ids)
    with torch.no_grad():
        from_ids = model(input_ids=input_ids, pixel_values=images(1))
        from_embeds = model(inputs_embeds=embeds, pixel_values=images(1))
    torch.testing.assert_close(from_embeds.logits, from_ids.logits)
    with pytest.raises(ValueError, match=rf"{SEQ} image tokens.*2 images were given"):
        model(inputs_embeds=embeds, pixel_values=images(2))


def test_breadth_features_batched_equal_one_prompt_at_a_time(model):
    """The single batched encoder pass computes what a loop over prompts and images computes."""
    encoder, config = model.model.breadth_encoder, model.config
    with torch.no_grad():
        depth = model.model.get_depth_features(images(2)).pooler_output
        batched = model.model.get_breadth_features(depth)
        for task in config.breadth_prompts:
            ids = torch.tensor(config.florence_prompts[task]["input_ids"])
            for i in range(2):
                embeds = torch.cat([depth[i], encoder.embed_tokens(ids).to(depth.dtype)])[None]
                alone = encoder(inputs_embeds=embeds).last_hidden_state[0, :SEQ]
                torch.testing.assert_close(batched[task][i], alone)


def test_masking_prompt_padding_changes_only_padded_prompts():
    attended, masked = build(), build(attend_prompt_padding=False)
    masked.load_state_dict(attended.state_dict())
    with torch.no_grad():
        depth = attended.model.get_depth_features(images(1)).pooler_output
        a = attended.model.get_breadth_features(depth)
        m = masked.model.get_breadth_features(depth)
    torch.testing.assert_close(a["<DENSE_REGION_CAPTION>"], m["<DENSE_REGION_CAPTION>"])  # no padding
    assert (a["<OCR>"] - m["<OCR>"]).abs().max() > 1e-6  # four pad tokens


def test_fused_features_choose_and_order_the_projector_input():
    model = build(fused_features=["<OCR>", "depth"], projector_depth=2)
    assert model.model.dbfusion_projector.linears[0].in_features == 2 * model.config.vision_config.projection_dim
    assert len(model.model.dbfusion_projector.linears) == 2
    pixel_values = images(1)
    with torch.no_grad():
        depth = model.model.get_depth_features(pixel_values).pooler_output
        breadth = model.model.get_breadth_features(depth)
        assert list(breadth) == ["<OCR>"]
        expected = model.model.dbfusion_projector(torch.cat([breadth["<OCR>"], depth], dim=-1))
        torch.testing.assert_close(model.get_image_features(pixel_values).pooler_output, expected)


@pytest.mark.parametrize("llm", ["llama", "phi3"])
def test_sdpa_and_eager_attention_agree(llm, tmp_path):
    sdpa = build(llm)
    sdpa.save_pretrained(tmp_path)
    eager = type(sdpa).from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float64).eval()
    # The choice reaches the LLM and the Florence-2 encoder (and, on 5.x, whose DaViT dispatches on it, the tower).
    for model, implementation in ((sdpa, "sdpa"), (eager, "eager")):
        assert model.model.language_model.config._attn_implementation == implementation
        assert model.model.breadth_encoder.config._attn_implementation == implementation
        if not IS_TRANSFORMERS_4:
            assert model.model.vision_tower.config._attn_implementation == implementation
    inputs = dict(input_ids=prompt(sdpa, 4, "image", 5), pixel_values=images(1))
    with torch.no_grad():
        torch.testing.assert_close(eager(**inputs).logits, sdpa(**inputs).logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = dict(input_ids=prompt(build(), 3, "image", 3), pixel_values=images(1))
    grads = []
    for checkpointing in (False, True):
        model = build().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.language_model.gradient_checkpointing
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("vision_tower" in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_tied_word_embeddings_follow_the_text_config(tmp_path):
    from conftest import TINY_ENCODER, TINY_TEXT, TINY_VISION

    from florence_vl.configuration_florence_vl import FlorenceVLConfig

    config = FlorenceVLConfig(
        vision_config=TINY_VISION,
        breadth_encoder_config=TINY_ENCODER,
        text_config=dict(TINY_TEXT["llama"], tie_word_embeddings=True),
        image_token_id=5,
    )
    assert config.tie_word_embeddings
    model = FlorenceVLForConditionalGeneration(config)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)
