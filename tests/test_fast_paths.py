"""Fast paths compute what the plain ones compute: static KV cache (and a fully traced decode step) give the dynamic
cache's tokens, engine-facing attention backends compute sdpa's outputs, and the benchmark script still runs (its
naive breadth loop agreeing with the batched pass, its FLOP count agreeing with torch's)."""

from __future__ import annotations

import contextlib
import copy
import io
import sys

import pytest
import torch
from conftest import ROOT, TINY_ENCODER, TINY_TEXT, TINY_VISION, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AttentionInterface, CompileConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from florence_vl.compatibility_florence_vl import IS_TRANSFORMERS_4
from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration

sys.path.insert(0, str(ROOT / "benchmarks"))
import benchmark  # noqa: E402
import overhead  # noqa: E402

NEW = 6


@pytest.fixture(scope="module", params=["llama", "phi3"])
def model(request) -> FlorenceVLForConditionalGeneration:
    torch.manual_seed(0)
    model = FlorenceVLForConditionalGeneration(tiny_config(request.param)).eval()
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    return model


def prompt(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt [text ; image placeholders ; text] with its pixel values (float32)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    ids = torch.cat([torch.randint(9, vocab, (5,), generator=generator),
                     torch.full((model.config.image_seq_length,), model.config.image_token_id),
                     torch.randint(9, vocab, (4,), generator=generator)])[None]
    pixels = torch.randn(1, 3, 768, 768, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def with_llm_attention(model, attention: str) -> FlorenceVLForConditionalGeneration:
    """A copy of `model` whose LLM alone runs `attention` (tower and breadth encoder stay on sdpa), same weights."""
    backends = {"": "sdpa", "vision_config": "sdpa", "breadth_encoder_config": "sdpa", "text_config": attention}
    copied = type(model)._from_config(copy.deepcopy(model.config), attn_implementation=backends).eval()
    copied.load_state_dict(model.state_dict())
    copied.generation_config.pad_token_id = model.generation_config.pad_token_id
    return copied


def generate(model, inputs: dict, **options) -> list[int]:
    output = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **options)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def test_static_cache_gives_the_dynamic_cache_tokens(model):
    inputs = prompt(model, seed=1)
    assert generate(model, inputs, cache_implementation="static") == generate(model, inputs)


def test_traced_static_decode_step_gives_the_dynamic_cache_tokens(model):
    """`compile_config` with fullgraph=True: dynamo must trace the whole decode step (no graph break, hence no
    `.item()`-style host sync in it). The "eager" backend keeps this a tracing test of seconds; inductor on CPU needs
    a C++ build of about a minute (measured equal tokens with it under 5.23, see benchmarks/README.md)."""
    if IS_TRANSFORMERS_4 and model.config.text_config.model_type == "phi3":
        pytest.skip("4.57's longrope update branches on torch.max(position_ids) (Phi3ForCausalLM alone breaks too)")
    inputs = prompt(model, seed=2)
    compile_config = CompileConfig(fullgraph=True, backend="eager")
    compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told otherwise
    traced = generate(model, inputs, cache_implementation="static", compile_config=compile_config)
    assert getattr(model, "_compiled_call", None) is not None  # the decode steps did run compiled
    assert traced == generate(model, inputs)


def test_llm_runs_a_registered_attention_backend_and_only_the_llm(model):
    """What serving engines rely on (vLLM's Transformers backend registers its paged attention the same way): a
    function registered in transformers' AttentionInterface, given to the LLM alone, runs in every LLM layer, never
    in the tower or the breadth encoder, and computes what sdpa computes."""
    calls = []

    def counting_sdpa(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("florence_vl_test_counting_sdpa", counting_sdpa)
    served = with_llm_attention(model, "florence_vl_test_counting_sdpa")
    inputs = prompt(model, seed=3)
    with torch.no_grad():
        expected = model(**inputs).logits
        assert calls == []
        got = served(**inputs).logits
    llm_attention = type(model.model.language_model.layers[0].self_attn).__name__
    assert calls == [llm_attention] * model.config.text_config.num_hidden_layers
    torch.testing.assert_close(got, expected)
    assert generate(served, inputs) == generate(model, inputs)


def test_llm_flex_attention_gives_sdpa_outputs(model):
    """torch's flex attention (the other engine-facing backend, installed with torch) given to the LLM: same logits on
    a left-padded batch, same greedy tokens. It compiles its kernel, hence seconds on CPU."""
    flex = with_llm_attention(model, "flex_attention")
    assert flex.model.language_model.config._attn_implementation == "flex_attention"
    single = prompt(model, seed=4)
    pad = model.generation_config.pad_token_id
    padded = {"input_ids": torch.cat([torch.full((1, 3), pad), single["input_ids"][:, 3:]], 1),
              "attention_mask": torch.cat([torch.zeros(1, 3, dtype=torch.long), single["attention_mask"][:, 3:]], 1)}
    batch = {"input_ids": torch.cat([single["input_ids"], padded["input_ids"]]),
             "attention_mask": torch.cat([single["attention_mask"], padded["attention_mask"]]),
             "pixel_values": single["pixel_values"].repeat(2, 1, 1, 1)}
    with torch.no_grad():
        expected, got = model(**batch).logits, flex(**batch).logits
    mask = batch["attention_mask"].bool()  # padded positions attend to nothing: their logits are arbitrary
    torch.testing.assert_close(got[mask], expected[mask])
    assert generate(flex, single) == generate(model, single)


def test_benchmark_tiny_dimensions_are_the_tests_ones():
    assert benchmark.TINY == {"vision": TINY_VISION, "encoder": TINY_ENCODER, "text": TINY_TEXT["llama"]}


def test_benchmark_smoke_runs_on_tiny(tmp_path):
    """The script runs end to end on the tiny size (table, every ratio) and its naive breadth loop is exact."""
    out = io.StringIO()
    argv = ["--sizes", "tiny", "--batches", "1", "--repeats", "1", "--new-tokens", "2", "--ratio-size", "tiny",
            "--ratio-batch", "2", "--ratios", "breadth,static,load,convert", "--convert-dims", "128,2,1000",
            "--compile-backend", "eager", "--json", str(tmp_path / "results.json")]
    with contextlib.redirect_stdout(out):
        assert benchmark.main(argv) == 0
    text = out.getvalue()
    assert "| size | batch | depth ms | breadth ms |" in text and "| tiny | 1 |" in text
    for line in ("Breadth (tiny, batch 2", "Static cache + torch.compile (tiny, batch 1",
                 "Loading (tiny)", "Converter ("):
        assert line in text, line
    results = __import__("json").loads((tmp_path / "results.json").read_text())
    assert results["breadth"]["max_abs_diff"] < 1e-5
    assert "no exact batching can beat the loop by more than" in text and results["breadth"]["ceiling"] > 0
    assert results["static"]["same_tokens"] and 0 < results["static"]["fraction_of_bound"] < 1
    assert results["convert"]["largest_shard"] > 0


def test_benchmark_breadth_flops_match_torch_flop_counter():
    """The FLOP count behind the printed breadth ceiling equals what torch counts in the real pass (SDPA's math
    kernel, so that its matrix products are visible to the counter)."""
    model = benchmark.build_model("tiny", torch.device("cpu"), torch.float32)
    depth = torch.randn(2, model.config.image_seq_length, model.config.vision_config.projection_dim)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.model.get_breadth_features(depth)
    assert benchmark.encoder_flops(model, 2 * len(model.config.breadth_prompts)) == counter.get_total_flops()


def test_benchmark_refuses_real_sizes_on_cpu():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        benchmark.main(["--sizes", "8b", "--device", "cpu"])


def test_overhead_rounds_rotate_the_order_and_ratios_pair_within_a_round():
    calls = []
    arms = {name: (lambda name=name: calls.append(name) or float(len(calls))) for name in "abc"}
    times = overhead.rounds(arms, 6)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up
    orders = ["".join(calls[3 + 3 * i: 6 + 3 * i]) for i in range(6)]
    assert orders == ["abc", "bca", "cab", "cba", "acb", "bac"]  # rotated, then reversed: no arm always first
    assert all(len(values) == 6 for values in times.values())
    paired = overhead.ratios({"x": [2.0, 4.0, 6.0, 9.0], "y": [1.0, 2.0, 3.0, 3.0], "z": [1.0, 2.0, 3.0, 6.0]},
                             {"x/y": (("x",), ("y",)), "x/(y+z)": (("x",), ("y", "z"))})
    assert paired["x/y"] == (2.0, 2.0, 2.25) and paired["x/(y+z)"][0] == 1.0


def test_overhead_guard_fails_on_a_gross_decode_regression(monkeypatch, capsys):
    """The CI guard (scripts/test.sh) is this script with --guard: a decode step made slower must fail it."""
    import time

    forward = FlorenceVLForConditionalGeneration.forward

    def slow_decode(self, *args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            time.sleep(0.02)  # a tiny decode step takes about 2 ms
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FlorenceVLForConditionalGeneration, "forward", slow_decode)
    assert overhead.main(["--size", "tiny", "--groups", "decode", "--rounds", "4", "--new-tokens", "3",
                          "--guard", "1.6"]) == 1
    out, err = capsys.readouterr()
    assert "decode, text only: ours / bare LLM" in out and "decode control" in out and "IQR" in out
    assert err.strip().splitlines()[-1].startswith("error: median ratio above the guard x1.6: decode, text only")


def test_overhead_features_equal_native_florence2_and_refuses_bad_options(capsys):
    """The features group first checks that ours and the native Florence-2 compute the same breadth states."""
    assert overhead.main(["--size", "tiny", "--groups", "features,ttft", "--rounds", "4"]) == 0
    out = capsys.readouterr().out
    assert "image features: ours / native Florence-2" in out and "TTFT control: parts / parts again" in out
    assert overhead.main(["--groups", "speed"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown groups")
