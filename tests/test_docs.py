"""Every ```python block of docs/ runs as written, in order, one namespace per file, on every machine (GPU blocks
fall back to the CPU), and prints what the page says it prints. The blocks run in a scratch folder that sees the
repository's assets/ (what they write, e.g. an offload folder, stays out of the repository). Blocks marked for vLLM
run in tests/test_vllm.py (in the vLLM virtualenv), the TRL block in tests/test_trl.py (in the 5.x one, which has TRL).
Every ```bash block runs as written from the repository root, its `# A: ...` comments being what it prints, unless the
page marks it `<!-- docs-test: not run in CI: REASON -->` (real weights, a GPU, a server that runs until stopped)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import ROOT, VLLM_MARKER, card_python_blocks

ELSEWHERE = {VLLM_MARKER, "<!-- card-test: trl -->"}
PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if not p.name.endswith("_template.md"))
# The words each page's blocks print, in order: assets/example.png shows one green triangle.
PRINTED = {
    "usage.md": ["triangle", "green", "triangle", "one", "triangle", "triangle", "triangle"],
    "memory.md": ["green", "green"],
    "fine-tuning.md": ["breadth_encoder", "language_model", "language_model"],
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


SHELL_BLOCK = re.compile(r"(?:<!-- docs-test: (?P<marker>[^>]*?) -->\n)?```bash\n(?P<code>.*?)```", re.S)
NOT_RUN = "not run in CI: "


def shell_blocks(page) -> list[tuple[str, str]]:
    """(marker, code) of every ```bash block of the page; marker "" when it has none."""
    return [(match["marker"] or "", match["code"]) for match in SHELL_BLOCK.finditer(page.read_text())]


@pytest.mark.parametrize("page", [p for p in PAGES if shell_blocks(p)], ids=lambda p: p.name)
def test_shell_blocks_run_as_written_or_say_why_not(page, ask_sh_venv):  # .venv as ask.sh's first run makes it
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # a user's shell
    for marker, code in shell_blocks(page):
        if marker:
            assert marker.startswith(NOT_RUN) and len(marker) > len(NOT_RUN) + 20, f"{page.name}: {marker!r}"
            continue
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=1500)
        assert result.returncode == 0, f"{page.name} block failed:\n{code}\n{result.stderr[-3000:]}"
        answers = [line for line in result.stdout.splitlines() if line.startswith("A: ")]
        promised = [comment.removesuffix("...").strip() for comment in re.findall(r"# (A: [^\n]*)", code)]
        assert len(answers) == len(promised) and all(a.startswith(p) for a, p in zip(answers, promised)), \
            (page.name, answers, promised)
