"""Every ```python block of docs/ runs as written, in order, one namespace per file, on every machine (GPU blocks
fall back to the CPU), and prints what the page says it prints. The blocks run in a scratch folder that sees the
repository's assets/ (what they write, e.g. an offload folder, stays out of the repository). Blocks marked for vLLM
run in tests/test_vllm.py, the TRL block in tests/test_trl.py."""

from __future__ import annotations

import pytest

from conftest import ROOT, VLLM_MARKER, card_python_blocks

ELSEWHERE = {VLLM_MARKER, "<!-- card-test: trl -->"}
PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if not p.name.endswith("_template.md"))
# The words each page's blocks print, in order: assets/example.png shows one green triangle.
PRINTED = {
    "usage.md": ["triangle", "green", "triangle", "one", "triangle", "triangle", "triangle"],
    "memory.md": ["green", "green"],
}


def blocks_of(page) -> list[str]:
    """The page's blocks that run here."""
    return [code for marker, code in card_python_blocks(page.read_text()) if marker not in ELSEWHERE]


@pytest.mark.parametrize("page", [p for p in PAGES if blocks_of(p)], ids=lambda p: p.name)
def test_page_runs_as_written(page, tmp_path, monkeypatch, capfd):
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for index, code in enumerate(blocks_of(page)):
        try:
            exec(compile(code, f"{page.name} python block {index}", "exec"), namespace)
        except Exception as error:  # name the block: the traceback alone points into a string
            raise AssertionError(f"{page.name} python block {index} failed:\n{code}") from error
    assert capfd.readouterr().out.split() == PRINTED[page.name]


def test_every_page_with_code_is_checked():
    assert {p.name for p in PAGES if blocks_of(p)} == set(PRINTED)


def test_vllm_blocks_are_marked():
    """docs/serving.md's vLLM blocks carry the marker (tests/test_vllm.py runs them); no other block uses vLLM."""
    serving = [code for marker, code in card_python_blocks((ROOT / "docs" / "serving.md").read_text())
               if marker == VLLM_MARKER]
    assert len(serving) == 2 and "from vllm import LLM" in serving[0] and "OpenAI(" in serving[1]
    assert not any("vllm" in code or "OpenAI(" in code for page in PAGES for code in blocks_of(page))
