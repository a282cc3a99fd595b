"""README.md is the Hub model card: its front matter, and every ```python block runs as written, in order, in one
namespace (later blocks reuse earlier variables), with MODEL set to a tiny converted repo folder. Blocks after a
`<!-- card-test: skip-without-cuda -->` marker run only where CUDA exists. The converter writes the same card."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import ROOT

README = ROOT / "README.md"
CUDA_MARKER = "<!-- card-test: skip-without-cuda -->"
BLOCK = re.compile(r"(?P<marker><!-- card-test: [^>]*-->\n)?```python\n(?P<code>.*?)```", re.S)


def front_matter(text: str) -> dict:
    """The YAML front matter of a model card."""
    assert text.startswith("---\n"), "the model card must start with YAML front matter"
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def python_blocks(text: str) -> list[tuple[str, bool]]:
    """(code, needs_cuda) of every ```python block, in order."""
    return [(m["code"], (m["marker"] or "").strip() == CUDA_MARKER) for m in BLOCK.finditer(text)]


def test_front_matter():
    meta = front_matter(README.read_text())
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["library_name"] == "transformers"
    assert meta["license"]
    assert "microsoft/Florence-2-large" in meta["base_model"]
    assert {"florence-vl", "custom_code", "arxiv:2412.04424"} <= set(meta["tags"])


def test_sections_exist():
    text = README.read_text()
    for heading in ("### Pipeline with chat messages", "### Processor + model", "### Multi-turn", "### Batching",
                    "### Streaming", "### GPU, bfloat16", "## Converting the released checkpoints",
                    "## Browser demo", "## Fine-tuning", "## Benchmarks", "## Citation",
                    "## What `trust_remote_code=True` runs"):
        assert heading in text, heading
    assert "benchmarks/README.md" in text
    assert "AutoModelForVision2Seq" in text


def test_usage_snippets_run_in_order(tiny_repo_factory, monkeypatch, capsys):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 6
    monkeypatch.chdir(ROOT)  # the snippets use assets/example.png relative to the repository root
    namespace = {"__name__": "__readme__", "MODEL": str(tiny_repo_factory("llama"))}
    ran = 0
    for index, (code, needs_cuda) in enumerate(blocks):
        if needs_cuda and not torch.cuda.is_available():
            continue  # reported by test_cuda_only_snippets
        try:
            exec(compile(code, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:  # name the block: the traceback alone points into a string
            raise AssertionError(f"README python block {index} failed:\n{code}") from error
        ran += 1
    assert ran == sum(1 for _, needs_cuda in blocks if torch.cuda.is_available() or not needs_cuda)
    printed = capsys.readouterr().out
    assert printed.strip()  # the snippets print their answers


def test_cuda_only_snippets():
    cuda_blocks = [code for code, needs_cuda in python_blocks(README.read_text()) if needs_cuda]
    assert cuda_blocks, "the GPU bfloat16 block should carry the skip-without-cuda marker"
    if not torch.cuda.is_available():
        pytest.skip(f"{len(cuda_blocks)} README block(s) marked {CUDA_MARKER} need CUDA (none here); "
                    "test_usage_snippets_run_in_order runs them where CUDA exists")


def test_converter_writes_the_same_card(tmp_path):
    import convert_checkpoint

    staging = tmp_path / ".florence-vl-3b.x1y2z3.partial"  # the converter writes into such a staging folder
    staging.mkdir()
    config = SimpleNamespace(image_seq_length=577)
    convert_checkpoint.write_model_card(staging, "llava_phi", "jiuhai/florence-vl-3b-sft", config, "tower note")
    card = (staging / "README.md").read_text()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "image-text-to-text" and "arxiv:2412.04424" in meta["tags"]
    assert "jiuhai/florence-vl-3b-sft" in meta["base_model"]
    assert "# Florence-VL 3B" in card and "jiuhai/florence-vl-3b-sft" in card
    readme_blocks = python_blocks(README.read_text())
    card_blocks = python_blocks(card)
    assert [c.replace("MODEL", '"florence-vl-3b"') for c, _ in readme_blocks] == [c for c, _ in card_blocks]
    assert "## Fine-tuning" in card and "## Citation" in card and "./ask.sh" not in card
