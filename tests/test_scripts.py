"""The documented commands as a newcomer runs them: from another working directory, with relative paths, with the
usual mistakes (one `error:` line, no traceback, no Hub lookup for a missing folder), the same options everywhere,
and no warning noise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = {"ask": ROOT / "ask.py", "app": ROOT / "app.py", "finetune": ROOT / "finetune.py"}


def run_script(script: Path, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` from `cwd`, with the environment a user has (no PYTHONPATH into this repo)."""
    env = dict(os.environ, PYTHONPATH="")
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Failed with exit status 2 and one line alone, `error: ...`, naming the problem: no traceback, no usage block."""
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [line for line in lines if not line.startswith("No --model given")] == lines[-1:], lines
    assert lines[-1].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture()
def elsewhere(tmp_path) -> Path:
    """A working directory outside the repository, as a user's."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def test_ask_missing_relative_model_folder_is_one_error_line_not_a_hub_lookup(elsewhere):
    started = time.monotonic()
    result = run_script(SCRIPTS["ask"], "--model", "./florence-vl-8b", cwd=elsewhere)
    assert_one_error_line(result, "--model ./florence-vl-8b", "no such folder", str(elsewhere / "florence-vl-8b"))
    assert time.monotonic() - started < 60  # no network retries (they took about 30 s before)


@pytest.mark.parametrize("model", ["florence-vl-8b", "~/models/florence-vl-8b", "out/models/florence-vl-8b"])
def test_names_that_cannot_be_hub_ids_are_folders(elsewhere, model):
    assert_one_error_line(run_script(SCRIPTS["ask"], "--model", model, cwd=elsewhere), "no such folder")


def test_a_missing_folder_inside_an_existing_one_is_a_folder_not_a_hub_id(elsewhere):
    """`models/florence` looks like a Hub id, but models/ is a folder here: a path, never a Hub lookup."""
    (elsewhere / "models").mkdir()
    started = time.monotonic()
    result = run_script(SCRIPTS["ask"], "--model", "models/florence", cwd=elsewhere)
    assert_one_error_line(result, "--model models/florence", "no such folder", str(elsewhere / "models" / "florence"))
    assert time.monotonic() - started < 30


def test_an_unknown_hub_id_is_one_error_line_after_one_lookup(elsewhere):
    """Offline (as the tests run) with nothing cached; online it would be one request, not transformers' retries."""
    started = time.monotonic()
    result = run_script(SCRIPTS["ask"], "--model", "nobody-here/florence-vl", cwd=elsewhere)
    assert_one_error_line(result, "--model nobody-here/florence-vl", "no such folder")
    assert "retry" not in result.stderr.lower() and time.monotonic() - started < 30


def test_an_original_release_folder_says_to_convert_it(elsewhere):
    from conftest import require_fixture

    release = require_fixture() / "original_checkpoint"
    result = run_script(SCRIPTS["ask"], "--model", str(release), cwd=elsewhere)
    assert_one_error_line(result, "original Florence-VL release", "llava_llama", "convert_checkpoint.py")


def test_paths_are_shown_normalised(elsewhere, monkeypatch):
    """`../ft-out` typed in a folder is shown (and used) as the folder it names, not `.../work/../ft-out`."""
    from cli_common import user_path

    monkeypatch.chdir(elsewhere)
    assert user_path("../ft-out") == elsewhere.parent / "ft-out"
    assert user_path("~/x").parts[-1] == "x" and ".." not in user_path("a/../b").parts


def test_an_image_folder_is_named_as_a_folder(elsewhere):
    (elsewhere / "photos").mkdir()
    assert_one_error_line(run_script(SCRIPTS["ask"], "--image", "photos", cwd=elsewhere), "is a folder")


@pytest.mark.parametrize("args, fragment", [(["--max-new-tokens", "0"], "at least 1"),
                                            (["--max-new-tokens", "-5"], "at least 1"),
                                            (["--question", " "], "--question is empty")])
def test_ask_sh_usage_mistakes_are_one_line_naming_ask_sh(elsewhere, args, fragment, ask_sh_venv):
    """Run as the README does, through ask.sh (its .venv made first, as ask.sh's first run makes it)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(ROOT / "ask.sh"), *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=600)
    assert_one_error_line(result, "ask.sh:", fragment)


def test_ask_missing_image_is_one_error_line(elsewhere):
    result = run_script(SCRIPTS["ask"], "--image", "photo.png", cwd=elsewhere)
    assert_one_error_line(result, "--image photo.png", str(elsewhere / "photo.png"))


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    """A loopback HTTP server whose only file is text, not an image."""
    import functools
    import http.server
    import threading

    folder = tmp_path_factory.mktemp("served")
    (folder / "notes.png").write_text("this is text, not a PNG")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("case", ["unreachable_url", "not_an_image_url", "text_file", "zero_tokens", "negative_tokens"])
def test_ask_expected_mistakes_are_one_error_line_before_the_model_loads(elsewhere, text_server, case):
    (elsewhere / "notes.txt").write_text("not an image")
    url_without_server = "http://127.0.0.1:9/photo.png"  # port 9 (discard): nothing listens on loopback there
    args, fragments = {
        "unreachable_url": (["--image", url_without_server], [url_without_server, "could not fetch"]),
        "not_an_image_url": (["--image", f"{text_server}/notes.png"], ["could not fetch an image"]),
        "text_file": (["--image", "notes.txt"], ["--image notes.txt", "not an image file"]),
        "zero_tokens": (["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
        "negative_tokens": (["--max-new-tokens", "-5"], ["--max-new-tokens", "at least 1"]),
    }[case]
    started = time.monotonic()
    result = run_script(SCRIPTS["ask"], *args, cwd=elsewhere)
    assert_one_error_line(result, *fragments)
    assert time.monotonic() - started < 30  # refused before loading anything (no model, no retries)


def test_ask_relative_model_folder_from_another_directory(tiny_repo_factory, elsewhere):
    folder = tiny_repo_factory("llama")
    relative = os.path.relpath(folder, elsewhere)
    result = run_script(SCRIPTS["ask"], "--model", relative, "--max-new-tokens", "3", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("Q: What colour is the shape?\nA: "), result.stdout[:500]
    assert result.stderr.strip() == "", result.stderr  # no notices, warnings or loading bars


def test_ask_sh_runs_from_another_directory_with_relative_paths(tmp_path, ask_sh_venv):
    """The README's main command, exactly: it sets up .venv itself on first use (minutes on a fresh clone: the
    session's ask_sh_venv makes it as ask.sh does, and keeps what that first run said)."""
    import shapes_data

    image = tmp_path / "shape.png"
    shapes_data.draw_scene(shapes_data.Scene("square", "blue", 1), __import__("random").Random(3)).save(image)
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(ROOT / "ask.sh"), "--image", "../shape.png", "--question", "What shape is it?"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # Nothing but the answer lines on stdout, with the right word.
    assert result.stdout == "Q: What shape is it?\nA: square\n", result.stdout[:500]
    first = ask_sh_venv["stderr"]
    if ask_sh_venv["fresh"]:  # the first run said what it installs
        assert "[1/2] " in first and "Virtualenv ready" in first, first[-3000:]
        assert re.search(r"torch 2\.13\.0('s CPU build)? from", first), first[-3000:]
    # The one environment runs every script: the LoRA, demo and conversion dependencies are there too.
    check = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", "import peft, gradio, accelerate, safetensors"],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-2000:]


@pytest.mark.parametrize("name", ["ask", "app", "finetune"])
def test_every_script_has_the_same_device_and_dtype_options(name, elsewhere):
    result = run_script(SCRIPTS[name], "--help", cwd=elsewhere, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--device DEVICE" in text and "--dtype {auto,float32,bfloat16,float16}" in text
    assert "--cpu" not in text and "--fp32" not in text
    if name in ("ask", "app"):
        assert re.search(r"--max-new-tokens MAX_NEW_TOKENS", text)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ask_dtype_and_device_options_work(elsewhere, dtype):
    """--dtype loads the weights in that dtype (bfloat16 runs on a CPU too) and the embedded model still answers;
    --device cuda answers on a GPU and is one error line where there is none."""
    image = str(ROOT / "assets" / "example.png")
    result = run_script(SCRIPTS["ask"], "--image", image, "--dtype", dtype, "--device", "cpu", cwd=elsewhere)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "A: green", result.stderr[-2000:]
    on_gpu = run_script(SCRIPTS["ask"], "--image", image, "--dtype", dtype, "--device", "cuda", cwd=elsewhere)
    import torch

    if torch.cuda.is_available():
        assert on_gpu.returncode == 0 and on_gpu.stdout.splitlines()[-1] == "A: green", on_gpu.stderr[-2000:]
    else:
        assert_one_error_line(on_gpu, "--device cuda", "no CUDA GPU")


def test_answer_length_is_the_same_everywhere():
    import app
    import ask
    from cli_common import DEFAULT_MAX_NEW_TOKENS

    assert ask.parse_args([]).max_new_tokens == app.parse_args([]).max_new_tokens == DEFAULT_MAX_NEW_TOKENS == 256
    for page in (ROOT / "README.md", ROOT / "docs" / "usage.md"):
        assert set(re.findall(r"max_new_tokens=(\d+)", page.read_text())) == {"256"}, page


@pytest.fixture()
def no_gpu_path(tmp_path) -> str:
    """PATH with an `nvidia-smi` that finds no GPU in front (whatever the test machine has)."""
    stub = tmp_path / "bin" / "nvidia-smi"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    stub.chmod(0o755)
    return f"{stub.parent}:{os.environ['PATH']}"


def choose_torch(path: str, **env: str) -> tuple[list[str], str, float]:
    """scripts/choose_torch.sh's pip arguments, its one line, and its seconds."""
    environment = {key: value for key, value in os.environ.items() if key != "TORCH_INDEX_URL"}
    started = time.monotonic()
    result = subprocess.run([str(ROOT / "scripts" / "choose_torch.sh")], env={**environment, "PATH": path, **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # says its choice in one line
    return result.stdout.split(), result.stderr.strip(), time.monotonic() - started


def test_first_run_without_gpu_installs_torch_cpu_build_from_the_cpu_index(no_gpu_path, tmp_path):
    """The CPU index is added to the user's pip settings (never replacing their index)."""
    import functools
    import http.server
    import threading

    (tmp_path / "index" / "torch").mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "index"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    index = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        args, line, _ = choose_torch(no_gpu_path, TORCH_CPU_INDEX_URL=index)
    finally:
        server.shutdown()
    assert args == ["--extra-index-url", index, "torch==2.13.0+cpu"]
    assert line.startswith("No NVIDIA GPU found: installing torch 2.13.0's CPU build"), line


@pytest.mark.parametrize("index", ["refused", "silent"])
def test_first_run_without_gpu_falls_back_to_the_users_pip_settings_within_seconds(no_gpu_path, index):
    """An index that refuses or never answers costs at most the 5 s probe, not pip's minutes of retries."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    if index == "silent":
        listener.listen()  # accepts connections, never answers
    port = listener.getsockname()[1]
    try:
        args, line, seconds = choose_torch(no_gpu_path, TORCH_CPU_INDEX_URL=f"http://127.0.0.1:{port}/whl")
    finally:
        listener.close()
    assert args == ["torch==2.13.0+cpu"] and "did not answer" in line, line
    assert seconds < 15


def test_first_run_with_a_gpu_or_a_chosen_index_installs_as_told(tmp_path):
    stub = tmp_path / "nvidia-smi"
    stub.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    stub.chmod(0o755)
    args, line, _ = choose_torch(f"{tmp_path}:{os.environ['PATH']}")
    assert args == ["torch==2.13.0"] and "NVIDIA GPU found" in line
    args, _, _ = choose_torch(os.environ["PATH"], TORCH_INDEX_URL="https://example.invalid/simple")
    assert args == ["--index-url", "https://example.invalid/simple", "torch==2.13.0"]


def write_samples(folder: Path, rows: list[dict]) -> Path:
    """A JSONL data file for finetune.py."""
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_finetune_bad_data_fails_before_loading_the_model(tiny_repo_factory, elsewhere):
    rows = [{"image": "a.png", "question": "q", "answer": "a"}]
    (elsewhere / "a.png").write_bytes((ROOT / "assets" / "example.png").read_bytes())
    rows.append({"image": "missing.png", "question": "q", "answer": "a"})
    write_samples(elsewhere, rows)
    result = run_script(SCRIPTS["finetune"], "--model", str(tiny_repo_factory("llama")), "--data", "data.jsonl",
                        "--output-dir", "out", "--device", "cpu", cwd=elsewhere)
    assert_one_error_line(result, "sample 1", "missing.png")
    assert "Loading" not in result.stderr + result.stdout and not (elsewhere / "out").exists()


@pytest.mark.parametrize("rows,fragment", [
    ([{"image": "a.png", "question": "q"}], "none of conversations, messages, or question and answer"),
    ([{"image": "a.png", "question": "", "answer": "a"}], "a user turn is empty"),
    ([{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}], "the last turn must be an answer"),
    ([{"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}],
     "1 image markers (<image> / image blocks) but 0 images"),
    ([{"image": "a.png", "conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]}],
     "roles must be"),
    ([], "no samples"),
])
def test_finetune_data_errors_name_the_problem(elsewhere, rows, fragment):
    (elsewhere / "a.png").write_bytes((ROOT / "assets" / "example.png").read_bytes())
    write_samples(elsewhere, rows)
    result = run_script(SCRIPTS["finetune"], "--data", "data.jsonl", "--output-dir", "out", "--device", "cpu",
                        cwd=elsewhere)
    assert_one_error_line(result, fragment)


@pytest.mark.parametrize("case", ["unreachable_url", "not_an_image_url", "text_file"])
def test_finetune_bad_images_are_one_error_line_before_the_model_loads(elsewhere, text_server, case):
    (elsewhere / "a.png").write_bytes((ROOT / "assets" / "example.png").read_bytes())
    (elsewhere / "notes.png").write_text("not an image")
    image, fragment = {
        "unreachable_url": ("http://127.0.0.1:9/photo.png", "could not fetch"),
        "not_an_image_url": (f"{text_server}/notes.png", "could not fetch an image"),
        "text_file": ("notes.png", "is not an image file"),
    }[case]
    write_samples(elsewhere, [{"image": "a.png", "question": "q", "answer": "a"},
                              {"image": image, "question": "q", "answer": "a"}])
    started = time.monotonic()
    result = run_script(SCRIPTS["finetune"], "--data", "data.jsonl", "--output-dir", "out", "--device", "cpu",
                        cwd=elsewhere)
    assert_one_error_line(result, "sample 1", fragment)
    assert time.monotonic() - started < 60 and not (elsewhere / "out").exists()


def test_finetune_refuses_to_overwrite_a_non_empty_output_folder(elsewhere):
    (elsewhere / "out").mkdir()
    (elsewhere / "out" / "config.json").write_text("{}")
    write_samples(elsewhere, [{"image": "a.png", "question": "q", "answer": "a"}])
    result = run_script(SCRIPTS["finetune"], "--data", "data.jsonl", "--output-dir", "out", "--device", "cpu",
                        cwd=elsewhere)
    assert_one_error_line(result, "exists and is not empty", "--overwrite")
    assert (elsewhere / "out" / "config.json").read_text() == "{}"


def test_finetune_streams_checkpoints_shows_progress_and_prints_no_warnings(tiny_repo_factory, elsewhere):
    (elsewhere / "a.png").write_bytes((ROOT / "assets" / "example.png").read_bytes())
    write_samples(elsewhere, [{"image": "a.png", "question": "What colour is the shape?", "answer": "green"}] * 2)
    common = ["--model", str(tiny_repo_factory("llama")), "--data", "data.jsonl", "--output-dir", "out", "--stage", "2",
              "--learning-rate", "1e-3", "--device", "cpu"]
    result = run_script(SCRIPTS["finetune"], *common, "--max-steps", "2", "--save-steps", "1", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    out = elsewhere / "out"
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir() and (out / "model.safetensors").is_file()
    assert "2/2 [" in result.stderr  # the progress bar
    assert "Warning" not in result.stderr and "warn" not in result.stderr.lower(), result.stderr[-3000:]
    # --resume continues from the newest checkpoint instead of starting again: one more step (a restart would take
    # three), then the checkpoint rotation keeps the newest two.
    resumed = run_script(SCRIPTS["finetune"], *common, "--max-steps", "3", "--save-steps", "1", "--resume",
                         cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after 3 steps" in resumed.stdout
    assert resumed.stdout.count("'loss'") == 1, resumed.stdout[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]


def test_finetune_dataset_renders_lazily():
    import finetune

    calls = []

    class CountingProcessor:
        def apply_chat_template(self, *args, **kwargs):
            calls.append(1)
            raise AssertionError("rendered up front")

    samples = [{"messages": [], "images": ["x.png"]}] * 10_000
    dataset = finetune.ChatDataset(CountingProcessor(), samples)
    assert len(dataset) == 10_000 and calls == []
