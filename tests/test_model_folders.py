"""Every folder the project ships is a complete Hub repo: the embedded model, copied alone (links resolved, as an
upload sends it) to another directory, loads there with the Auto classes, the pipeline and `ask.py --model`, and
answers; its code files are real files, byte-equal to the root's, and a plain `cp -r` of it loads; its card carries Hub metadata and runs as written.
(The converter's and finetune.py's folders: tests/test_model_card.py and tests/test_finetune.py; vLLM serves such a
copy in tests/test_vllm.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from conftest import ROOT, card_python_blocks

from florence_vl.configuration_florence_vl import REMOTE_CODE_FILES

SHIPPED = ROOT / "assets" / "tiny-florence-vl"
EXAMPLE = ROOT / "assets" / "example.png"  # a green triangle


@pytest.fixture(scope="module")
def copied_alone(tmp_path_factory):
    """The shipped folder as an upload sends it: its files (links resolved) and nothing else of the repository."""
    target = tmp_path_factory.mktemp("upload") / "tiny-florence-vl-uploaded"
    shutil.copytree(SHIPPED, target, symlinks=False)
    assert not any(path.is_symlink() for path in target.rglob("*"))
    return target


def test_shipped_code_is_real_files_equal_to_the_roots():
    for name in REMOTE_CODE_FILES:
        shipped = SHIPPED / name
        assert shipped.is_file() and not shipped.is_symlink(), f"{shipped} must be a file, not a link"
        assert shipped.read_bytes() == (ROOT / name).read_bytes(), (
            f"{shipped} differs from the root's {name}: copy it (cp {name} assets/tiny-florence-vl/)")
    assert not [path.name for path in SHIPPED.rglob("*") if path.is_symlink()]


def test_plain_recursive_copy_loads(tmp_path):
    """`cp -r` (links kept as links) gives a folder that loads, as a zip or `git add` of it would."""
    target = tmp_path / "tiny-florence-vl-cp-r"
    subprocess.run(["cp", "-r", str(SHIPPED), str(target)], check=True)
    script = ("import sys; from transformers import AutoConfig, AutoProcessor; "
              "c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True); "
              "p = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True); "
              "print(type(c).__name__, type(p).__name__)")
    result = subprocess.run([sys.executable, "-c", script, str(target)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=""))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["FlorenceVLConfig", "FlorenceVLProcessor"]


def test_card_has_hub_metadata_and_runs_as_written(monkeypatch, capfd):
    text = (SHIPPED / "README.md").read_text()
    meta = yaml.safe_load(text.split("\n---\n", 1)[0][4:])
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["library_name"] == "transformers"
    assert meta["license"] == "mit" and "custom_code" in meta["tags"]
    (code,) = [code for _, code in card_python_blocks(text)]
    monkeypatch.chdir(ROOT)
    exec(compile(code, "assets/tiny-florence-vl/README.md", "exec"), {"__name__": "__card__"})
    assert capfd.readouterr().out.split() == ["green"]


def test_copy_loads_elsewhere_with_the_auto_classes_and_answers(copied_alone, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    monkeypatch.chdir(tmp_path)  # nowhere near the repository
    processor = AutoProcessor.from_pretrained(copied_alone, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(copied_alone, trust_remote_code=True).eval()
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.open(EXAMPLE)},
                                         {"type": "text", "text": "What shape is it?"}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == "triangle"
    pipe = pipeline("image-text-to-text", model=str(copied_alone), trust_remote_code=True)
    chat[0]["content"][1]["text"] = "What colour is the shape?"
    assert pipe(text=chat, max_new_tokens=8, return_full_text=False)[0]["generated_text"].strip() == "green"


def test_ask_with_the_copy_as_model(copied_alone, tmp_path):
    env = dict(os.environ, PYTHONPATH="")
    result = subprocess.run([sys.executable, str(ROOT / "ask.py"), "--model", str(copied_alone), "--image",
                             str(EXAMPLE), "--question", "How many shapes are there?"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["Q: How many shapes are there?", "A: one"]
