"""Saving a model folder and loading it back through every Auto class, offline, under this and the other
transformers version (the other one runs in a subprocess when FLORENCE_VL_OTHER_PYTHON names its python)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ROOT, TINY_ENCODER, TINY_TEXT, TINY_VISION, require, tiny_config
from safetensors.torch import load_file

from florence_vl.compatibility_florence_vl import IS_TRANSFORMERS_4, rope_settings
from florence_vl.configuration_florence_vl import REMOTE_CODE_FILES, FlorenceVLConfig
from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration, FlorenceVLModel

OTHER_PYTHON = os.environ.get("FLORENCE_VL_OTHER_PYTHON")
REPO_FILES = {"config.json", "configuration_florence_vl.py", "modeling_florence_vl.py", "model.safetensors"}

AUTO_CLASSES = ["AutoModelForImageTextToText", "AutoModelForCausalLM"] + (["AutoModelForVision2Seq"] if IS_TRANSFORMERS_4 else [])


def sample_inputs(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt with one image: text ids around the image's placeholder tokens."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(9, config.text_config.vocab_size, (10,), generator=generator)
    image = torch.full((config.image_seq_length,), config.image_token_id)
    return {
        "input_ids": torch.cat([text[:4], image, text[4:]])[None],
        "pixel_values": torch.randn(1, 3, 768, 768, generator=generator),
    }


@pytest.fixture(scope="module", params=["llama", "phi3"])
def saved(request, tmp_path_factory) -> tuple[Path, FlorenceVLForConditionalGeneration]:
    torch.manual_seed(0)
    model = FlorenceVLForConditionalGeneration(tiny_config(request.param)).eval()
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model.save_pretrained(folder)
    return folder, model


def test_saved_folder_is_a_remote_code_repo(saved):
    """The files a model's repo needs, the code equal to ours, an auto_map naming our classes, and every weight saved."""
    folder, model = saved
    assert REPO_FILES <= {p.name for p in folder.iterdir()}
    for name in set(REMOTE_CODE_FILES) - {"processing_florence_vl.py"}:  # a model's save writes no processor
        assert (folder / name).read_bytes() == (ROOT / name).read_bytes(), name
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_florence_vl.FlorenceVLForConditionalGeneration"
    assert auto_map["AutoConfig"] == "configuration_florence_vl.FlorenceVLConfig"
    weights = load_file(str(folder / "model.safetensors"))
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[k], v) for k, v in expected.items())


@pytest.mark.parametrize("auto_class", AUTO_CLASSES)
def test_auto_class_reloads_identical_logits(saved, auto_class):
    folder, model = saved
    reloaded = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(reloaded).__name__ == "FlorenceVLForConditionalGeneration"
    inputs = sample_inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_auto_model_loads_the_base_model(saved):
    folder, model = saved
    base = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(base).__name__ == FlorenceVLModel.__name__
    inputs = sample_inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)


def test_vision2seq_exists_only_in_v4():
    assert hasattr(transformers, "AutoModelForVision2Seq") == IS_TRANSFORMERS_4


def test_loading_in_float64_and_with_eager_attention(saved):
    folder, model = saved
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float64, attn_implementation="eager"
    )
    assert reloaded.dtype == torch.float64
    assert reloaded.config.text_config._attn_implementation == "eager"
    assert reloaded.model.vision_tower.convs[0].conv.weight.dtype == torch.float64


def test_device_map_auto_loads_on_cpu(saved):
    require("accelerate", "accelerate is not installed (requirements.txt)")
    folder, model = saved
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, device_map="auto"
    ).eval()
    assert {p.device.type for p in reloaded.parameters()} == {"cpu"}
    inputs = sample_inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


OTHER_VERSION_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers
    from safetensors.torch import load_file, save_file
    folder, inputs_file, out = sys.argv[1:4]
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = load_file(inputs_file)
    with torch.no_grad():
        logits = model(**inputs).logits
    text = model.config.text_config
    rope = getattr(text, "rope_parameters", None) or dict(text.rope_scaling or {}, rope_theta=text.rope_theta)
    print(transformers.__version__, rope.get("rope_theta"), rope.get("rope_type", rope.get("type")))
    save_file({"logits": logits.contiguous()}, out)
    if len(sys.argv) > 4:
        model.save_pretrained(sys.argv[4])
    """
)


def run_other_version(*args: Path) -> str:
    """Run OTHER_VERSION_SCRIPT under the other transformers version; its stdout."""
    if not OTHER_PYTHON:
        pytest.skip("FLORENCE_VL_OTHER_PYTHON is not set (.ci/run sets it to the other version's python)")
    result = subprocess.run(
        [OTHER_PYTHON, "-c", OTHER_VERSION_SCRIPT, *map(str, args)],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_folder_saved_here_loads_under_the_other_version(tmp_path):
    from safetensors.torch import load_file, save_file

    # Llama-3.1-style rope: the setting 5.x used to drop silently for 4.57.
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    text = dict(TINY_TEXT["llama"], rope_scaling={**rope, "original_max_position_embeddings": 64})
    config = FlorenceVLConfig(
        vision_config=TINY_VISION, breadth_encoder_config=TINY_ENCODER, text_config=text, image_token_id=5
    )
    torch.manual_seed(0)
    model = FlorenceVLForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "repo")
    inputs = sample_inputs(config)
    save_file(inputs, tmp_path / "inputs.safetensors")
    stdout = run_other_version(tmp_path / "repo", tmp_path / "inputs.safetensors", tmp_path / "out.safetensors")
    version, theta, rope_type = stdout.split()[-3:]
    assert version.split(".")[0] != transformers.__version__.split(".")[0]
    assert (float(theta), rope_type) == (500000.0, "llama3")
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["logits"], expected)


def test_folder_saved_by_the_other_version_loads_here(tmp_path, saved):
    from safetensors.torch import save_file

    folder, model = saved
    inputs = sample_inputs(model.config)
    save_file(inputs, tmp_path / "inputs.safetensors")
    run_other_version(folder, tmp_path / "inputs.safetensors", tmp_path / "out.safetensors", tmp_path / "resaved")
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(
        tmp_path / "resaved", trust_remote_code=True
    ).eval()
    assert rope_settings(reloaded.config.text_config) == rope_settings(model.config.text_config)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_module_cache_stays_in_the_temporary_hf_home():
    assert os.environ["HF_HOME"] != os.path.expanduser("~/.cache/huggingface")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert sys.modules["florence_vl"].__path__
