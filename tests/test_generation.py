"""`generate`: greedy, sampling and beam search with a KV cache; batches with left padding; images encoded once."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration

SEQ = 577
NEW = 6


@pytest.fixture(scope="module", params=["llama", "phi3"])
def model(request) -> FlorenceVLForConditionalGeneration:
    torch.manual_seed(0)
    model = FlorenceVLForConditionalGeneration(tiny_config(request.param)).double().eval()
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    return model


def sample(model, text_lengths: list[int], num_images: int, seed: int) -> tuple[torch.LongTensor, torch.Tensor]:
    """Ids of text pieces with an image's placeholders between consecutive pieces, and the pixel values."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    pieces = []
    for i, length in enumerate(text_lengths):
        pieces.append(torch.randint(9, vocab, (length,), generator=generator))
        if i < num_images:
            pieces.append(torch.full((SEQ,), model.config.image_token_id))
    pixels = torch.randn(num_images, 3, 768, 768, generator=generator, dtype=torch.float64)
    return torch.cat(pieces), pixels


def generate(model, input_ids, pixel_values=None, attention_mask=None, **kwargs) -> torch.LongTensor:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    options = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, **kwargs}
    output = model.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **options)
    return output[:, input_ids.shape[1] :]


def left_pad(sequences: list[torch.LongTensor], pad: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, width - len(s) :] = s
        mask[row, width - len(s) :] = 1
    return ids, mask


def test_cached_and_uncached_decoding_agree(model):
    ids, pixels = sample(model, [5, 4], 1, seed=1)
    cached = generate(model, ids[None], pixels)
    uncached = generate(model, ids[None], pixels, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_batch_with_left_padding_equals_one_by_one(model):
    """Different lengths and image counts (none, one, two) in one left-padded batch."""
    samples = [sample(model, [7], 0, seed=2), sample(model, [3, 6], 1, seed=3), sample(model, [2, 2, 5], 2, seed=4)]
    alone = [generate(model, ids[None], pixels if len(pixels) else None)[0].tolist() for ids, pixels in samples]
    ids, mask = left_pad([ids for ids, _ in samples], model.config.text_config.pad_token_id)
    pixels = torch.cat([pixels for _, pixels in samples])
    batched = generate(model, ids, pixels, attention_mask=mask)
    assert batched.tolist() == alone


def test_images_are_encoded_once_per_generate_call(model, monkeypatch):
    calls = []
    encode = model.model.get_image_features
    monkeypatch.setattr(model.model, "get_image_features",
                        lambda pv, **kwargs: calls.append(len(pv)) or encode(pv, **kwargs))
    ids, pixels = sample(model, [3, 3, 3], 2, seed=5)
    generate(model, ids[None], pixels)
    assert calls == [2]
    calls.clear()
    generate(model, ids[None], pixels, num_beams=3)
    assert calls == [2 * 3]  # generate repeats the inputs per beam before the one prefill


def test_beam_search_matches_greedy_with_one_beam_and_runs_batched(model):
    """One beam is greedy; a batch of two different prompts returns, per prompt, the beams of that prompt alone."""
    first, first_pixels = sample(model, [4, 4], 1, seed=6)
    second, second_pixels = sample(model, [3, 5], 1, seed=16)
    assert generate(model, first[None], first_pixels, num_beams=1).tolist() == generate(model, first[None], first_pixels).tolist()
    options = {"num_beams": 3, "num_return_sequences": 2}
    alone = [generate(model, ids[None], pixels, **options).tolist() for ids, pixels in
             ((first, first_pixels), (second, second_pixels))]
    beams = generate(model, torch.stack([first, second]), torch.cat([first_pixels, second_pixels]), **options)
    assert beams.tolist() == alone[0] + alone[1]
    assert alone[0] != alone[1] and alone[0][0] != alone[0][1]  # distinct prompts and distinct beams


def test_sampling_is_reproducible_with_a_seed_and_samples(model):
    """The same seed, the same tokens; another seed, other tokens; and not the greedy tokens: it really samples,
    within the top_k most likely tokens of each step."""
    ids, pixels = sample(model, [4, 4], 1, seed=7)

    def sampled(seed: int) -> list[int]:
        torch.manual_seed(seed)
        return generate(model, ids[None], pixels, do_sample=True, top_k=20, temperature=2.0)[0].tolist()

    runs = [sampled(123), sampled(123), sampled(124)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert runs[0] != generate(model, ids[None], pixels)[0].tolist()
    with torch.no_grad():  # every sampled token among the 20 most likely at its step
        full = torch.cat([ids, torch.tensor(runs[0])])[None]
        logits = model(input_ids=full, pixel_values=pixels).logits[0, len(ids) - 1 : -1]
    top = logits.topk(20).indices
    assert all(token in row.tolist() for token, row in zip(runs[0], top))


def test_text_only_generation(model):
    ids, _ = sample(model, [9], 0, seed=8)
    tokens = generate(model, ids[None])
    assert tokens.shape == (1, NEW)
    with torch.no_grad():
        first = model(input_ids=ids[None]).logits[0, -1].argmax()
    assert tokens[0, 0] == first


def test_greedy_tokens_agree_across_runs_and_attention_backends(model, tmp_path):
    """Determinism: the same tokens twice, and with eager attention as with sdpa, in float64 and float32."""
    model.save_pretrained(tmp_path)

    def load(dtype, attention):
        loaded = type(model).from_pretrained(tmp_path, attn_implementation=attention, dtype=dtype).eval()
        loaded.generation_config.pad_token_id = model.generation_config.pad_token_id
        return loaded

    # float64: an unpadded batch. transformers' eager softmax runs in float32, where float64's mask minimum becomes
    # -inf, so fully masked (left-padding) rows turn into NaN under eager attention in float64 only.
    samples = [sample(model, [2, 3], 1, seed=9), sample(model, [4, 1], 1, seed=10)]
    ids, pixels = torch.stack([i for i, _ in samples]), torch.cat([p for _, p in samples])
    first = generate(model, ids, pixels).tolist()
    assert generate(model, ids, pixels).tolist() == first
    assert generate(load(torch.float64, "eager"), ids, pixels).tolist() == first

    # float32: a left-padded batch with and without images.
    samples = [sample(model, [6], 0, seed=11), sample(model, [2, 3], 1, seed=12)]
    ids, mask = left_pad([i for i, _ in samples], model.config.text_config.pad_token_id)
    pixels = torch.cat([p for _, p in samples]).float()
    sdpa = generate(load(torch.float32, "sdpa"), ids, pixels, attention_mask=mask).tolist()
    assert generate(load(torch.float32, "eager"), ids, pixels, attention_mask=mask).tolist() == sdpa


# The behaviours of transformers' GenerationTesterMixin tests that its source distribution does not ship
# (tests/generation/): left padding, generating from inputs_embeds, continuing from inputs_embeds with a cache.
def test_none_of_the_generation_tests_skip_conditions_hold(model):
    """The mixin skips these tests for a config with a top-level `encoder*` attribute (taken for encoder-decoder),
    without `use_cache` on the text config, or when `prepare_inputs_for_generation` hides `inputs_embeds`."""
    import inspect

    from transformers import PretrainedConfig

    assert "inputs_embeds" in inspect.signature(model.prepare_inputs_for_generation).parameters
    assert model.config.get_text_config().use_cache
    base = PretrainedConfig().to_dict()  # 4.57's base config has `encoder_no_repeat_ngram_size`: not our side
    assert not [name for name in model.config.to_dict() if name.startswith("encoder") and name not in base]


def test_left_padding_leaves_the_next_token_logits_unchanged(model):
    ids, pixels = sample(model, [6, 3], 1, seed=5)
    with torch.no_grad():
        unpadded = model(input_ids=ids[None], pixel_values=pixels).logits[:, -1]
        padded_ids, mask = left_pad([ids], model.config.text_config.pad_token_id)
        pad = torch.full((1, 7), model.config.text_config.pad_token_id)
        padded_ids, mask = torch.cat([pad, padded_ids], 1), torch.cat([torch.zeros_like(pad), mask], 1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = model(input_ids=padded_ids, attention_mask=mask, position_ids=position_ids,
                       pixel_values=pixels).logits[:, -1]
    torch.testing.assert_close(padded, unpadded)


@pytest.mark.parametrize("num_images", [0, 1])
def test_generate_from_inputs_embeds_equals_generate_from_ids(model, num_images):
    """Only the new tokens come back, the same as from the ids (with an image, its placeholders are found by their
    embedding); random embeddings generate too."""
    ids, pixels = sample(model, [4, 5][: num_images + 1], num_images, seed=6)
    embeds = model.get_input_embeddings()(ids[None])
    from_ids = generate(model, ids[None], pixels if num_images else None)
    options = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False}
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids[None]),
                                 pixel_values=pixels if num_images else None, **options)
    assert from_embeds.tolist() == from_ids.tolist()
    noise = torch.randn(2, 5, embeds.shape[-1], generator=torch.Generator().manual_seed(0), dtype=embeds.dtype)
    assert model.generate(inputs_embeds=noise, **options).shape == (2, NEW)


def test_generate_continues_from_inputs_embeds_and_its_cache(model):
    """Generating 2N tokens at once equals N, then N more from the cache and the embeddings of all tokens so far."""
    ids, _ = sample(model, [8], 0, seed=7)
    options = {"do_sample": False, "return_dict_in_generate": True}
    embeds = model.get_input_embeddings()(ids[None])
    whole = model.generate(inputs_embeds=embeds, max_new_tokens=2 * NEW, min_new_tokens=2 * NEW, **options)
    first = model.generate(inputs_embeds=embeds, max_new_tokens=NEW, min_new_tokens=NEW, **options)
    so_far = torch.cat([ids[None], first.sequences], dim=1)
    second = model.generate(inputs_embeds=model.get_input_embeddings()(so_far), past_key_values=first.past_key_values,
                            max_new_tokens=NEW, min_new_tokens=NEW, **options)
    assert torch.cat([first.sequences, second.sequences], dim=1).tolist() == whole.sequences.tolist()
