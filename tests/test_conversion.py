"""convert_checkpoint.py: the mapping covers the real 8B/3B releases, a Phi-3 (3B-style) release converts and runs,
and the CLI prints its summary and honours --dtype, --max-shard-size, --vision-tower and --dry-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ROOT, SHARED, require_fixture
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_checkpoint as cc
from florence_vl.compatibility_florence_vl import rope_settings
from florence_vl.configuration_florence_vl import RELEASE_IMAGE_TOKEN_IDS

MANIFESTS = SHARED / "fixtures" / "real_size_manifests.json"
OTHER_PYTHON = os.environ.get("FLORENCE_VL_OTHER_PYTHON")

LLAVA_KEYS = {
    "mm_hidden_size": 1024, "mm_projector_type": "mlp3x_gelu", "mm_patch_merge_type": "flat",
    "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_vision_select_layer": -2,
    "image_aspect_ratio": "pad", "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
    "use_mm_proj": True, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
}
# Release configs as the original code saved them (LLaVA wrapper keys + the LLM's own), from the facts doc.
def release_image_token_id(release: dict) -> int:
    """The id the release's tokenizer gives its image token (no tokenizer ships in the manifests)."""
    return RELEASE_IMAGE_TOKEN_IDS[cc.SUPPORTED[release["model_type"]][0]]


RELEASES = {name: config for name, config in json.loads((ROOT / "benchmarks" / "real_releases.json").read_text()).items()
            if not name.startswith("_")}


def florence2_large_tower_config() -> dict:
    """Florence-2-large's config.json in the original remote-code format (only the fields the converter reads)."""
    return json.loads((ROOT / "benchmarks" / "real_releases.json").read_text())["_florence2_large_tower_config"]


@pytest.fixture(scope="module")
def manifests() -> dict:
    if not MANIFESTS.is_file():
        pytest.fail(f"{MANIFESTS} is missing")
    return json.loads(MANIFESTS.read_text())


def run_cli(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    """The converter as a user runs it (offline, private HF_HOME inherited from conftest)."""
    return subprocess.run([python, str(ROOT / "convert_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=600)


def check_full_coverage(plan: cc.Plan, config) -> None:
    """Every target tensor filled exactly once at the model's shape, nothing left over."""
    expected, _ = cc.target_shapes(config)
    targets = [p.target for p in plan.mapped]
    assert len(targets) == len(set(targets))
    assert {p.target: p.shape for p in plan.mapped} == expected


# ---------------------------------------------------------------------------------------------------- real sizes
@pytest.mark.parametrize("release_name", list(RELEASES))
def test_real_release_with_tower_in_shards(manifests, release_name):
    release = RELEASES[release_name]
    tensors = cc.inventory_from_manifest(manifests[release_name])
    shapes = {t.name: t.shape for t in tensors if t.name.startswith(cc.TOWER_PREFIX)}
    vision, encoder = cc.infer_vision_configs(shapes)  # no tower config reachable offline: inferred
    config = cc.build_config(release, vision, encoder, release_image_token_id(release))
    plan = cc.build_plan(tensors, *cc.target_shapes(config))
    check_full_coverage(plan, config)
    assert len(plan.mapped) + len(plan.dropped) == len(manifests[release_name])
    reasons = plan.dropped_by_reason()
    assert reasons["Florence-2 decoder (unused by Florence-VL)"] == 316
    assert reasons["Florence-2 LM head (unused by Florence-VL)"] == 1
    assert reasons["Florence-2 final_logits_bias (unused by Florence-VL)"] == 1
    assert sum(r.startswith("tied copy of") for r in reasons.elements()) == 1  # encoder.embed_tokens == shared


@pytest.mark.parametrize("release_name", list(RELEASES))
def test_real_release_with_separate_tower_folder(manifests, release_name):
    tower_manifest = manifests["florence2_large_tower_folder"]
    shards = {k: v for k, v in manifests[release_name].items() if not k.startswith(cc.TOWER_PREFIX)}
    tensors = cc.inventory_from_manifest(shards) + cc.inventory_from_manifest(
        tower_manifest, prefix=cc.TOWER_PREFIX, origin="tower")
    vision, encoder = cc.vision_configs_from_florence2(florence2_large_tower_config())
    config = cc.build_config(RELEASES[release_name], vision, encoder,
                             release_image_token_id(RELEASES[release_name]))
    plan = cc.build_plan(tensors, *cc.target_shapes(config))
    check_full_coverage(plan, config)
    assert len(plan.mapped) + len(plan.dropped) == len(shards) + len(tower_manifest)


def test_inferred_and_declared_tower_configs_agree(manifests):
    tensors = cc.inventory_from_manifest(manifests["florence_vl_8b_llava_llama"])
    inferred = cc.infer_vision_configs({t.name: t.shape for t in tensors if t.name.startswith(cc.TOWER_PREFIX)})
    declared = cc.vision_configs_from_florence2(florence2_large_tower_config())
    for keys, a, b in (("vision", inferred[0], declared[0]), ("encoder", inferred[1], declared[1])):
        for key in ("depths", "embed_dim", "num_heads", "num_groups", "window_size", "projection_dim", "vocab_size",
                    "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "max_position_embeddings"):
            if key in a or key in b:
                assert list(a[key]) == list(b[key]) if isinstance(a[key], (list, tuple)) else a[key] == b[key], (keys, key)


@pytest.mark.parametrize("release_name", list(RELEASES))
def test_real_release_configs_keep_llm_settings(release_name):
    release = RELEASES[release_name]
    config = cc.build_config(release, *cc.vision_configs_from_florence2(florence2_large_tower_config()),
                             release_image_token_id(release))
    text = json.loads(config.to_json_string())["text_config"]  # as saved: with the keys 4.57 reads
    llava_only = {*LLAVA_KEYS, "mm_vision_tower"} - {"torch_dtype", "transformers_version"}
    assert not llava_only & set(text), llava_only & set(text)
    assert text["model_type"] == ("llama" if release["model_type"] == "llava_llama" else "phi3")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size", "rms_norm_eps", "rope_theta"):
        assert text[key] == release[key], key
    scaling = text["rope_scaling"]
    if release["model_type"] == "llava_llama":
        assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
        assert scaling["low_freq_factor"] == 1.0 and scaling["high_freq_factor"] == 4.0
        assert scaling["original_max_position_embeddings"] == 8192
    else:
        assert scaling["type"] == "longrope" and len(scaling["long_factor"]) == 48
        assert text["original_max_position_embeddings"] == 4096
    assert config.projector_depth == 3


@pytest.mark.parametrize("image_token_id", [128257, -1])
def test_image_token_outside_the_embedding_table_is_refused(image_token_id):
    release = RELEASES["florence_vl_8b_llava_llama"]
    with pytest.raises(cc.ConversionError, match=f"image_token_id {image_token_id} is not a token"):
        cc.build_config(release, *cc.vision_configs_from_florence2(florence2_large_tower_config()), image_token_id)


# ---------------------------------------------------------------------------------------------------- Phi-3 (3B-style)
TINY_PHI = {
    "architectures": ["LlavaPhiForCausalLM"], "model_type": "llava_phi", "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128, "vocab_size": 420,
    "max_position_embeddings": 4096, "original_max_position_embeddings": 1024, "rope_theta": 10000.0,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5] * 8},
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 401, "pad_token_id": 7,
    "tie_word_embeddings": False, "mm_vision_tower": "vision_tower", **LLAVA_KEYS, "mm_hidden_size": 32,
    "torch_dtype": "float32",
}
PHI_SPECIAL = ["<|system|>", "<|end|>", "<|user|>", "<|assistant|>", "<|placeholder1|>"]


def build_tiny_phi_release(folder: Path) -> Path:
    """A tiny `llava_phi` release: Phi-3 LLM with fused qkv/gate_up (as in the 3B manifest), the fixture's tower."""
    fixture = require_fixture() / "original_checkpoint"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(3)
    hidden, inter, vocab = TINY_PHI["hidden_size"], TINY_PHI["intermediate_size"], TINY_PHI["vocab_size"]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.05

    weights = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": 1 + rand(hidden),
               "lm_head.weight": rand(vocab, hidden)}
    for layer in range(TINY_PHI["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        weights.update({
            prefix + "self_attn.qkv_proj.weight": rand(3 * hidden, hidden),
            prefix + "self_attn.o_proj.weight": rand(hidden, hidden),
            prefix + "mlp.gate_up_proj.weight": rand(2 * inter, hidden),
            prefix + "mlp.down_proj.weight": rand(hidden, inter),
            prefix + "input_layernorm.weight": 1 + rand(hidden),
            prefix + "post_attention_layernorm.weight": 1 + rand(hidden),
        })
    width = 4 * TINY_PHI["mm_hidden_size"]
    weights.update({"model.mm_projector.encoder_mlp.0.weight": rand(hidden, width),
                    "model.mm_projector.encoder_mlp.0.bias": rand(hidden)})
    for i in (1, 2):
        weights.update({f"model.mm_projector.encoder_mlp.{i}.1.weight": rand(hidden, hidden),
                        f"model.mm_projector.encoder_mlp.{i}.1.bias": rand(hidden)})
    tower = load_file(str(fixture / "vision_tower" / "model.safetensors"))
    weights.update({cc.TOWER_PREFIX + k: v for k, v in tower.items()})
    # Two shards with an index, as the real releases ship.
    names = sorted(weights)
    half = len(names) // 2
    weight_map = {}
    for number, part in enumerate((names[:half], names[half:]), start=1):
        file = f"model-{number:05d}-of-00002.safetensors"
        save_file({k: weights[k].contiguous() for k in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(TINY_PHI))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [401, 4],
                                                               "pad_token_id": 7}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(fixture))
    tokenizer.add_special_tokens({"additional_special_tokens": PHI_SPECIAL})
    tokenizer.save_pretrained(str(folder))
    # The tower folder's config only (weights are in the shards), as mm_vision_tower names it.
    (folder / "vision_tower").mkdir()
    (folder / "vision_tower" / "config.json").write_text((fixture / "vision_tower" / "config.json").read_text())
    return folder


@pytest.fixture(scope="module")
def phi_release(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny_phi")
    src = build_tiny_phi_release(root / "src")
    out = root / "converted"
    cc.convert(str(src), str(out))
    return src, out


def test_phi3_release_converts_with_fused_projections(phi_release):
    src, out = phi_release
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "phi3"
    assert config["text_config"]["rope_scaling"]["type"] == "longrope"
    assert config["text_config"]["original_max_position_embeddings"] == 1024
    assert config["image_token_id"] == 404  # <|placeholder1|>: 400 tokens + 4 Phi-3 specials, then it (table: 420)
    converted = load_file(str(out / "model.safetensors"))
    with safe_open(str(src / "model-00001-of-00002.safetensors"), "pt") as first, \
            safe_open(str(src / "model-00002-of-00002.safetensors"), "pt") as second:
        source = {k: f.get_tensor(k) for f in (first, second) for k in f.keys()}
    assert torch.equal(converted["model.language_model.layers.1.self_attn.qkv_proj.weight"],
                       source["model.layers.1.self_attn.qkv_proj.weight"])
    assert torch.equal(converted["model.language_model.layers.0.mlp.gate_up_proj.weight"],
                       source["model.layers.0.mlp.gate_up_proj.weight"])
    assert torch.equal(converted["model.dbfusion_projector.linears.2.weight"],
                       source["model.mm_projector.encoder_mlp.2.1.weight"])
    assert torch.equal(converted["model.vision_projector.image_projection.weight"],
                       source[cc.TOWER_PREFIX + "image_projection"].t())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [401, 4]


def test_phi3_chat_format_and_generate(phi_release):
    _, out = phi_release
    processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    # This tiny release carries the fixture's tokenizer, which adds <|begin_of_text|>: the original's ids start with it.
    assert prompt == ("<|begin_of_text|><|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<|placeholder1|>\n"
                      "What is this?<|end|>\n<|assistant|>\n")
    model = transformers.AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    assert model.model.language_model.config.model_type == "phi3"
    inputs = processor(images=torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 577
    output = model.generate(**inputs, do_sample=False, min_new_tokens=4, max_new_tokens=4)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4
    # Greedy through Phi-3's cache: each new token is the argmax of a full forward pass over what precedes it.
    with torch.no_grad():
        logits = model(input_ids=output[:, :-1], pixel_values=inputs["pixel_values"]).logits
    assert torch.equal(logits[0, inputs["input_ids"].shape[1] - 1:].argmax(-1), output[0, inputs["input_ids"].shape[1]:])


# ---------------------------------------------------------------------------------------------------- CLI behaviour
def test_cli_summary_dtype_and_sharding(tmp_path):
    out = tmp_path / "bf16"
    result = run_cli(require_fixture() / "original_checkpoint", out, "--dtype", "bfloat16", "--max-shard-size", "2MB")
    assert result.returncode == 0, result.stderr
    assert "tensors mapped: 245" in result.stdout
    assert "tensors dropped: 31" in result.stdout and "Florence-2 decoder" in result.stdout
    assert "shard 1/" in result.stdout and "total size" in result.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    total = 0
    for file in files:
        with safe_open(str(out / file), "pt") as shard:
            for key in shard.keys():
                tensor = shard.get_tensor(key)
                assert tensor.dtype == torch.bfloat16, key
                assert index["weight_map"][key] == file
                total += tensor.numel() * tensor.element_size()
        size = (out / file).stat().st_size
        # The limit holds, except for a single tensor bigger than the limit (the BART embedding here).
        with safe_open(str(out / file), "pt") as shard:
            assert size <= 2_000_000 + 100_000 or len(list(shard.keys())) == 1
    assert index["metadata"]["total_size"] == total
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype="auto")
    assert model.dtype == torch.bfloat16


def test_cli_keeps_dtype_by_default(tmp_path):
    out = tmp_path / "auto"
    result = run_cli(require_fixture() / "original_checkpoint", out)
    assert result.returncode == 0, result.stderr
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_cli_vision_tower_override(tmp_path):
    """The tower comes from --vision-tower, not from the shards: a tower folder whose weights differ from the shards'
    gives the converted model its weights."""
    import shutil

    fixture = require_fixture() / "original_checkpoint"
    tower = tmp_path / "other_tower"
    shutil.copytree(fixture / "vision_tower", tower)
    weights = load_file(str(tower / "model.safetensors"))
    weights["image_proj_norm.weight"] = weights["image_proj_norm.weight"] + 1.0  # unlike the shards' copy
    save_file(weights, str(tower / "model.safetensors"))
    result = run_cli(fixture, tmp_path / "out", "--vision-tower", tower)
    assert result.returncode == 0, result.stderr
    assert "replaced by --vision-tower" in result.stdout and f"tower weights from {tower}" in result.stdout
    converted = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(converted["model.vision_projector.image_proj_norm.weight"], weights["image_proj_norm.weight"])


def test_cli_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "never"
    result = run_cli(require_fixture() / "original_checkpoint", out, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "Dry run" in result.stdout and "tensors mapped: 245" in result.stdout
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not OTHER_PYTHON, reason="FLORENCE_VL_OTHER_PYTHON names the other transformers version's python")
def test_converted_by_the_other_version_loads_here(tmp_path):
    out = tmp_path / "other"
    result = run_cli(require_fixture() / "original_checkpoint", out, python=OTHER_PYTHON)
    assert result.returncode == 0, result.stderr
    config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert rope_settings(config.text_config)["rope_theta"] == 500000.0 and config.text_config.rms_norm_eps == 1e-5
    processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == config.image_token_id == 5
    # Its weights load here and give the logits of the same release converted here.
    here = tmp_path / "here"
    assert run_cli(require_fixture() / "original_checkpoint", here).returncode == 0
    ids = torch.tensor([[0, 0, 2] + [5] * 577 + [40, 41, 42]])
    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (out, here):
        model = transformers.AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids, pixel_values=pixels).logits)
    assert torch.equal(logits[0], logits[1])
