"""Every ```python block of docs/ runs as written, in order, one namespace per file, from the repository root (the
embedded model is their MODEL), and prints what the page says it prints. Blocks marked for vLLM run in
tests/test_vllm.py, the TRL block in tests/test_trl.py; blocks marked `skip-without-cuda` run only where CUDA exists."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT, VLLM_MARKER, card_python_blocks

CUDA_MARKER = "<!-- card-test: skip-without-cuda -->"
ELSEWHERE = {VLLM_MARKER, "<!-- card-test: trl -->"}
PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if not p.name.endswith("_template.md"))
# The words each page's blocks print, in order: assets/example.png shows one green triangle.
PRINTED = {"usage.md": ["triangle", "green", "triangle", "one", "triangle", "triangle"]}


def blocks_of(page) -> list[tuple[str, bool]]:
    """(code, needs_cuda) of the page's blocks that run here."""
    return [(code, marker == CUDA_MARKER) for marker, code in card_python_blocks(page.read_text())
            if marker not in ELSEWHERE]


@pytest.mark.parametrize("page", [p for p in PAGES if blocks_of(p)], ids=lambda p: p.name)
def test_page_runs_as_written(page, monkeypatch, capfd):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "__docs__"}
    for index, (code, needs_cuda) in enumerate(blocks_of(page)):
        if needs_cuda and not torch.cuda.is_available():
            continue  # reported by test_cuda_blocks_need_cuda
        try:
            exec(compile(code, f"{page.name} python block {index}", "exec"), namespace)
        except Exception as error:  # name the block: the traceback alone points into a string
            raise AssertionError(f"{page.name} python block {index} failed:\n{code}") from error
    printed = capfd.readouterr().out.split()
    if page.name in PRINTED and not torch.cuda.is_available():
        assert printed == PRINTED[page.name]


def test_cuda_blocks_need_cuda():
    cuda = [(page.name, code) for page in PAGES for code, needs_cuda in blocks_of(page) if needs_cuda]
    assert cuda, "the GPU blocks should carry the skip-without-cuda marker"
    if not torch.cuda.is_available():
        pytest.skip(f"{len(cuda)} docs block(s) marked {CUDA_MARKER} need CUDA (none here): "
                    f"{sorted({name for name, _ in cuda})}")


def test_vllm_blocks_are_marked():
    """docs/serving.md's vLLM blocks carry the marker (tests/test_vllm.py runs them); no other block uses vLLM."""
    serving = [code for marker, code in card_python_blocks((ROOT / "docs" / "serving.md").read_text())
               if marker == VLLM_MARKER]
    assert len(serving) == 2 and "from vllm import LLM" in serving[0] and "OpenAI(" in serving[1]
    assert not any("vllm" in code or "OpenAI(" in code for page in PAGES for code, _ in blocks_of(page))
