"""README.md is the Hub model card: its front matter, its size and links, and its ```python blocks run as written, in
order, in one namespace, on the embedded model (docs/ blocks: tests/test_docs.py). The converter writes a card of its own
(docs/model_card_template.md) into each converted folder: its code runs from another directory against the Hub id,
as a Hub user runs it, and it holds what a user of that checkpoint needs and nothing of this repository."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, VLLM_MARKER, card_python_blocks, require_fixture

README = ROOT / "README.md"
HUB_ID = "test-org/florence-vl-tiny"


def front_matter(text: str) -> dict:
    """The YAML front matter of a model card."""
    assert text.startswith("---\n"), "the model card must start with YAML front matter"
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def python_blocks(text: str) -> list[tuple[str, bool]]:
    """Every ```python block that transformers alone runs, in order (not the vLLM ones)."""
    return [code for marker, code in card_python_blocks(text) if marker != VLLM_MARKER]


def test_front_matter():
    meta = front_matter(README.read_text())
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["library_name"] == "transformers"
    assert meta["license"]
    assert "microsoft/Florence-2-large-ft" in meta["base_model"]
    assert {"florence-vl", "custom_code", "arxiv:2412.04424"} <= set(meta["tags"])


def test_the_card_reads_in_one_sitting():
    """README.md is the model card: the two commands in the first screen, every other topic one link away, and the
    size of a card (at most 200 lines, 1,800 words of prose, code blocks of at most 25 lines)."""
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    body = text.split("\n---\n", 1)[1]
    prose = re.sub(r"```.*?```", "", body, flags=re.S)
    prose = re.sub(r"^\|.*\|$", "", prose, flags=re.M)  # tables are numbers, not prose
    assert len(prose.split()) <= 1800
    assert all(block.count("\n") <= 26 for block in re.findall(r"```.*?```", body, flags=re.S))
    first_screen = "\n".join(body.splitlines()[:20])  # what a rendered card shows before any scrolling
    assert "./ask.sh --image" in first_screen and "bash scripts/test.sh" in first_screen
    # Beside the test command: how long it takes, its extra virtualenvs, the browser it installs, ../shared.
    after = body[body.index("bash scripts/test.sh"):][:1200]
    assert all(word in after for word in ("minutes", ".venv-vllm", ".venv-lmms", "chromium", "../shared"))
    for heading in ("## Quick start: the two commands", "## Usage", "## The embedded tiny model",
                    "## Converting, publishing, serving, fine-tuning", "## Evaluation", "## Correctness", "## Limits",
                    "## License", "## Citation"):
        assert heading in text, heading
    topics = {p.name for p in (ROOT / "docs").glob("*.md") if not p.name.endswith("_template.md")}
    linked = set(re.findall(r"\(docs/([\w.-]+\.md)", text))
    assert topics == linked, f"docs not linked from the README: {topics - linked}; dead links: {linked - topics}"
    assert "AutoModelForVision2Seq" in text


def test_usage_snippets_run_as_written(monkeypatch, capfd):
    """The README's blocks, as written, from the repository root, each alone (a reader copies one): MODEL is the
    embedded folder, which answers the example image's colour with the word the README promises."""
    blocks = python_blocks(README.read_text())
    assert len(blocks) == 2
    monkeypatch.chdir(ROOT)
    for index, code in enumerate(blocks):
        namespace = {"__name__": "__readme__"}
        try:
            exec(compile(code, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:  # name the block: the traceback alone points into a string
            raise AssertionError(f"README python block {index} failed:\n{code}") from error
    printed = capfd.readouterr()
    assert printed.out.split() == ["green", "green"], printed.out  # the pipeline's answer, then generate's
    # The snippets pass nothing transformers warns about (5.x warned on padding=True in apply_chat_template).
    assert "Kwargs passed" not in printed.err, printed.err[-2000:]


def hub_cache_with(folder: Path, repo_id: str, hf_home: Path) -> None:
    """Lay `folder` out in `hf_home` as huggingface_hub caches a downloaded repo, so `repo_id` resolves offline."""
    import shutil

    revision = "0" * 40
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


@pytest.fixture(scope="module")
def converted_with_card(tmp_path_factory) -> Path:
    """The fixture release converted by the CLI, as a user runs it, with the Hub id its card should use."""
    out = tmp_path_factory.mktemp("card") / "florence-vl-tiny"
    result = subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"),
                             str(require_fixture() / "original_checkpoint"), str(out), "--repo-id", HUB_ID],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_converted_card_runs_from_another_directory_as_a_hub_user(converted_with_card, tmp_path):
    hf_home = tmp_path / "hf_home"
    hub_cache_with(converted_with_card, HUB_ID, hf_home)
    code = "\n".join(python_blocks((converted_with_card / "README.md").read_text()))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"the converted card's code failed:\n{code}\n{result.stderr[-3000:]}"
    assert len(result.stdout.strip().splitlines()) >= 3  # the pipeline's answer and the batch's two


def test_converted_card_is_for_this_checkpoint_and_its_users(converted_with_card):
    card = (converted_with_card / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "llama3.1" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"jiuhai/florence-vl-8b-sft", "microsoft/Florence-2-large-ft"} <= set(meta["base_model"])
    parameters = int(re.search(r"\(([\d,]+) parameters", card)[1].replace(",", ""))
    assert 2_000_000 < parameters < 2_200_000  # the fixture's tiny release, not the 8B it imitates
    assert "# Florence-VL 2.1M (Llama-3.1)\n" in card and "# Florence-VL 8B" not in card
    assert f'"{HUB_ID}"' in card
    for heading in ("## Usage", "## Memory", "## Intended use and limitations", "## Training data and procedure",
                    "## License", "## Citation"):
        assert heading in card, heading
    assert "Llama 3.1 Community License" in card and "MIT" in card
    # Nothing that exists only in the source repository or on the converting machine.
    for internal in ("ask.sh", "convert_checkpoint", "tests/", "benchmarks/", "finetune.py", "app.py",
                     str(require_fixture()), str(converted_with_card)):
        assert internal not in card, internal
    assert re.search(r"\| Florence-VL 2\.1M \(Llama-3\.1\) \| bfloat16 \| [\d.]+ MiB", card)


def test_converted_folder_is_usable_by_other_users(converted_with_card):
    umask = os.umask(0)
    os.umask(umask)
    for path in (converted_with_card, *converted_with_card.rglob("*")):
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == wanted, f"{path}: {oct(mode)}, expected {oct(wanted)}"
    assert (converted_with_card / "assets" / "example.png").is_file()


def test_card_without_hub_id_loads_the_absolute_folder(tmp_path):
    import convert_checkpoint

    out = tmp_path / "plain"
    convert_checkpoint.convert(str(require_fixture() / "original_checkpoint"), str(out))
    card = (out / "README.md").read_text()
    assert f'"{out.resolve()}"' in card and f'image = "{out.resolve()}/assets/example.png"' in card


def test_memory_table_is_the_computed_one():
    from benchmarks import memory_table

    computed = memory_table.table([memory_table.release_footprint(name) for name in memory_table.NAMES])
    assert computed in (ROOT / "docs" / "memory.md").read_text(), computed
    # The README quotes the 8B's bfloat16 and 4-bit totals from that table.
    rows = {row.split(" | ")[1]: row.split(" | ")[4] for row in computed.splitlines() if "8B" in row}
    assert f"The 8B needs {rows['bfloat16']} in bfloat16 and {rows['4-bit nf4/fp4']} in 4-bit" in README.read_text()
    # Sanity of the numbers themselves: the 8B in bfloat16 is 16 GiB of weights, 4-bit about 40% of that.
    footprint_8b = memory_table.release_footprint("florence_vl_8b_llava_llama")
    bf16 = footprint_8b.weights_bytes("bfloat16") / 1024**3
    nf4 = footprint_8b.weights_bytes("nf4") / 1024**3
    assert 15.5 < bf16 < 16.5 and 0.35 < nf4 / bf16 < 0.45
