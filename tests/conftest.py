"""Test set-up shared by every test file: offline Hub, a private HF_HOME, the repo as package `florence_vl`,
the fixture folder, and tiny Florence-VL configs."""

from __future__ import annotations

import importlib
import os
import re
import sys
import tempfile
from pathlib import Path

# Before transformers is imported: nothing may reach the network or the user's cache.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="florence_vl_hf_home_")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Overlays for transformers' own test files (scripts/fetch_common_tests.sh), not tests of ours.
collect_ignore = ["common_test_shims"]
# The ground truth: ../shared/fixtures/florence_vl_tiny_llama (the original code's outputs); CI clones next to it.
SHARED = Path(os.environ.get("FLORENCE_VL_SHARED", ROOT.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "florence_vl_tiny_llama"

sys.path.insert(0, str(ROOT))
from cli_common import register_model_package  # noqa: E402

register_model_package()

from florence_vl.configuration_florence_vl import IMAGE_TOKENS, FlorenceVLConfig  # noqa: E402

# Dimensions of the fixture's tiny checkpoint (Florence-2 tower, BART encoder, LLM).
TINY_VISION = dict(
    depths=[1, 1, 2, 1],
    embed_dim=[16, 32, 48, 64],
    num_heads=[1, 2, 3, 4],
    num_groups=[1, 2, 3, 4],
    projection_dim=32,
    drop_path_rate=0.0,
)
TINY_ENCODER = dict(
    vocab_size=51289,
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_layers=0,
    max_position_embeddings=1024,
    pad_token_id=1,
)
TINY_TEXT = {
    "llama": dict(
        model_type="llama",
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=4,
        pad_token_id=7,
    ),
    "phi3": dict(
        model_type="phi3",
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        original_max_position_embeddings=1024,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5] * 8},
        bos_token_id=1,
        eos_token_id=4,
        pad_token_id=7,
    ),
}


# The image token of each tiny tokenizer (the fixture's <|reserved_special_token_0|>, the tiny Phi-3's <|placeholder1|>).
TINY_IMAGE_TOKEN_IDS = {"llama": 5, "phi3": 8}


def tiny_config(llm: str = "llama", **overrides) -> FlorenceVLConfig:
    """A Florence-VL config with the fixture's tiny dimensions and the given LLM family."""
    return FlorenceVLConfig(
        vision_config=dict(TINY_VISION),
        breadth_encoder_config=dict(TINY_ENCODER),
        text_config=dict(TINY_TEXT[llm]),
        image_token_id=TINY_IMAGE_TOKEN_IDS[llm],
        **overrides,
    )


# What this run must have (scripts/test.sh names, per virtualenv, the extras it installed there): a missing one is an
# error, so a broken install never reads as a skip. Elsewhere (a bare `pytest`) a missing extra skips, naming itself.
REQUIRED = set(os.environ.get("FLORENCE_VL_REQUIRED", "").split())


def require(module: str, reason: str):
    """Import `module`; where it is missing, skip with `reason`, unless this run requires it (then fail)."""
    if module in REQUIRED:
        try:
            return importlib.import_module(module)
        except ImportError as error:
            pytest.fail(f"{module} is required in this run (FLORENCE_VL_REQUIRED) but does not import: {error}",
                        pytrace=False)
    return pytest.importorskip(module, reason=reason)


@pytest.fixture(scope="session")
def ask_sh_venv() -> dict:
    """.venv as ask.sh's first run makes it (scripts/setup_venv.sh, what ask.sh runs before ask.py), made once for
    the session before any test runs ask.sh: {"fresh": whether this session made it, "stderr": what that run said}, so
    the first-run messages are checked whichever test needs .venv first."""
    import subprocess

    fresh = not (ROOT / ".venv").exists()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(ROOT / "scripts" / "setup_venv.sh"), str(ROOT / ".venv")], env=env,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"fresh": fresh, "stderr": result.stderr + result.stdout}


# ```python blocks of a model card, each optionally preceded by a `<!-- card-test: ... -->` marker.
CARD_BLOCK = re.compile(r"(?P<marker><!-- card-test: [^>]*-->\n)?```python\n(?P<code>.*?)```", re.S)
VLLM_MARKER = "<!-- card-test: vllm -->"  # blocks that need vLLM: tests/test_vllm.py runs them, in .venv-vllm


def card_python_blocks(text: str) -> list[tuple[str, str]]:
    """(marker, code) of every ```python block of a card, in order; marker "" when there is none."""
    return [((match["marker"] or "").strip(), match["code"]) for match in CARD_BLOCK.finditer(text)]


def require_fixture() -> Path:
    """The fixture folder; a loud failure (not a skip) when `../shared` is missing."""
    if not FIXTURE.is_dir():
        pytest.fail(f"fixture folder {FIXTURE} is missing: clone next to ../shared or set FLORENCE_VL_SHARED")
    return FIXTURE


# ---------------------------------------------------------------------------------------------------------------
# Tiny complete repo folders (model + processor), for the processor, pipeline and loading tests.

ASSETS = ROOT / "tests" / "assets"
CHAT_TEMPLATES = ROOT / "chat_templates"


def tiny_processor(llm: str = "llama"):
    """A FlorenceVLProcessor with a tiny tokenizer of the given LLM family and the original chat template.

    llama: the fixture's byte-level tokenizer with Llama-3 specials, Llama-3 template.
    phi3: tests/assets/phi3_tiny_tokenizer (Phi-3 specials), Phi-3 template.
    Each tokenizer is made a Florence-VL folder's (`florence_vl_tokenizer`: no special tokens of its own), as the
    converter makes the release's.
    """
    from transformers import AutoTokenizer

    from convert_checkpoint import florence_vl_tokenizer
    from florence_vl.processing_florence_vl import FlorenceVLProcessor

    if llm == "llama":
        tokenizer_dir, template = require_fixture() / "original_checkpoint", "llama3.jinja"
    elif llm == "phi3":
        tokenizer_dir, template = ASSETS / "phi3_tiny_tokenizer", "phi3.jinja"
    else:
        raise ValueError(f"unknown llm {llm!r}: use 'llama' or 'phi3'")
    tokenizer = florence_vl_tokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    return FlorenceVLProcessor(tokenizer=tokenizer, chat_template=(CHAT_TEMPLATES / template).read_text(),
                               image_token=IMAGE_TOKENS[llm])


def save_tiny_repo(folder, llm: str = "llama", seed: int = 0, **config_overrides) -> Path:
    """Save a complete tiny remote-code repo (random model + processor) for `llm` in {"llama", "phi3"} into `folder`.

    Give every folder a unique basename: transformers 4.57 keys its remote-code module cache by basename.
    """
    import torch

    from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration

    folder = Path(folder)
    processor = tiny_processor(llm)
    config = tiny_config(llm, **config_overrides)
    config.image_token_id = processor.image_token_id  # the model finds the images by this id
    config.image_seq_length = processor.image_seq_length
    torch.manual_seed(seed)
    model = FlorenceVLForConditionalGeneration(config).eval()
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_repo_factory(tmp_path_factory):
    """Session cache of tiny repo folders: `tiny_repo_factory("llama")` -> Path (saved once per session)."""
    cache: dict[str, Path] = {}

    def make(llm: str = "llama") -> Path:
        if llm not in cache:
            cache[llm] = save_tiny_repo(tmp_path_factory.mktemp(f"florence_vl_tiny_{llm}_repo"), llm)
        return cache[llm]

    return make
