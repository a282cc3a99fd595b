"""app.py for real: the Gradio server in a subprocess on 127.0.0.1, driven by headless Chromium (Debian's chromium +
chromium-driver, through Selenium). Upload an image, ask, wait for the streamed answer, compare it with generate +
decode; a follow-up question (multi-turn); the clear button. A screenshot is saved as a test artefact."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import ROOT, require

require("gradio", "gradio is not installed here: it is installed only in the transformers 5.x venv (Gradio 6 needs "
        "huggingface_hub>=1, which transformers 4.57 rejects); see requirements-app.txt")
selenium = require("selenium", "selenium is not installed (requirements-test.txt)")

CHROMIUM = Path(os.environ.get("FLORENCE_VL_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("FLORENCE_VL_CHROMEDRIVER", "/usr/bin/chromedriver"))
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER}: Debian's chromium and chromium-driver could not be installed "
                "(scripts/test.sh installs them with apt-get when it runs as root with apt available)",
                allow_module_level=True)

IMAGE_PATH = ROOT / "assets" / "example.png"  # one green triangle
QUESTIONS = ["What colour is the shape?", "What shape is it?"]
KNOWN_ANSWERS = ["green", "triangle"]
MAX_NEW_TOKENS = 8
SERVER_START_S = 180
ANSWER_S = 120


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, log: Path) -> None:
    """Poll `url` until it answers; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"app.py did not answer at {url} within {SERVER_START_S}s:\n{log.read_text()[-4000:]}")


@dataclass
class Server:
    """The running app.py: its URL, process, log, and the temporary folder it was given (TMPDIR)."""

    url: str
    process: subprocess.Popen
    log: Path
    tmpdir: Path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The shipped embedded model copied alone (links resolved), as a Hub upload of it serves it."""
    target = tmp_path_factory.mktemp("app_model") / "tiny-florence-vl-app"
    shutil.copytree(ROOT / "assets" / "tiny-florence-vl", target, symlinks=False)
    return target


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    """app.py serving that copy (--model), started from another directory with its own TMPDIR; stopped at the end."""
    port = free_port()
    root = tmp_path_factory.mktemp("app")
    log, tmpdir = root / "server.log", root / "tmp"
    tmpdir.mkdir()
    command = [sys.executable, str(ROOT / "app.py"), "--model", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost", TMPDIR=str(tmpdir))
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(url, process, log)
        yield Server(url, process, log, tmpdir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through Debian's chromedriver: no network, a fresh profile, nothing downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium_profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def reference(folder):
    """Greedy generate + decode for the same model, image and questions, turn by turn (the expected answers)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True).eval()
    image = Image.open(IMAGE_PATH).convert("RGB")
    messages, answers = [], []
    for turn, question in enumerate(QUESTIONS):
        content = ([{"type": "image", "image": image}] if turn == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[-1]}]})
    return answers


def artifacts_dir(tmp_path_factory) -> Path:
    """Where screenshots go: $FLORENCE_VL_ARTIFACTS when set, else this session's pytest temporary folder."""
    folder = Path(os.environ["FLORENCE_VL_ARTIFACTS"]) if os.environ.get("FLORENCE_VL_ARTIFACTS") else \
        tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ask(driver, question: str, expected: str) -> str:
    """Type `question`, press Send, and wait until the streamed answer is complete; returns the plain-text answer."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#send").click()

    def answer_text() -> str:
        return driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value") or ""

    def finished(d) -> bool:
        # Done when this question is in the chat, Gradio shows no progress any more, and the answer is complete
        # (two turns may give the same text, so the answer box alone cannot tell the turns apart).
        chat = d.find_element(By.CSS_SELECTOR, "#chatbot").text
        return question in chat and "processing" not in chat and answer_text() == expected

    try:
        WebDriverWait(driver, ANSWER_S, poll_frequency=0.2).until(finished)
    except TimeoutException:
        pass  # the assertions of the caller report what arrived instead
    return answer_text()


def test_the_embedded_models_page_says_what_it_answers():
    """Without --model (app.main picks EMBEDDED_PAGE) the page says what the embedded model answers and suggests a
    question it was trained on; a --model page makes no such claim."""
    import app
    import ask
    import shapes_data

    embedded = str(app.build_demo(None, **app.EMBEDDED_PAGE).config)
    assert ask.EMBEDDED_SCOPE in embedded
    assert app.EMBEDDED_PAGE["example"] in shapes_data.BY_TEXT and app.EMBEDDED_PAGE["example"] in embedded
    assert ask.EMBEDDED_SCOPE not in str(app.build_demo(None, **app.PAGE).config)


def test_a_question_without_an_image_is_refused_with_a_notice(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    import app

    browser.get(server.url)
    box = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea"))
    box.send_keys("What colour is the shape?")
    browser.find_element(By.CSS_SELECTOR, "#send").click()
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value") == app.NO_IMAGE)
    assert "What colour is the shape?" not in browser.find_element(By.CSS_SELECTOR, "#chatbot").text
    # The question stays in its box, to be sent again once an image is there.
    assert browser.find_element(By.CSS_SELECTOR, "#question textarea").get_attribute("value") == \
        "What colour is the shape?"


def test_chat_in_the_browser(server, browser, reference, tmp_path_factory):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    wait = WebDriverWait(browser, 60)
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
    upload.send_keys(str(IMAGE_PATH))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))  # the uploaded preview

    first = ask(browser, QUESTIONS[0], reference[0])
    assert first == reference[0] and first.strip() == KNOWN_ANSWERS[0]
    chat_text = browser.find_element(By.CSS_SELECTOR, "#chatbot").text
    assert QUESTIONS[0] in chat_text

    second = ask(browser, QUESTIONS[1], reference[1])  # the follow-up continues the same conversation
    assert second == reference[1] and second.strip() == KNOWN_ANSWERS[1]
    assert QUESTIONS[1] in browser.find_element(By.CSS_SELECTOR, "#chatbot").text

    screenshot = artifacts_dir(tmp_path_factory) / "app_chat.png"
    assert browser.save_screenshot(str(screenshot))
    print(f"\nscreenshot: {screenshot}")
    shutil.copy(screenshot, screenshot.with_name("app_chat_latest.png"))

    browser.find_element(By.CSS_SELECTOR, "#clear").click()
    WebDriverWait(browser, 30).until(lambda d: QUESTIONS[0] not in d.find_element(By.CSS_SELECTOR, "#chatbot").text)
    assert browser.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value") == ""


def test_sigterm_stops_the_server_and_removes_its_temporary_files(server):
    # Runs last in this module: the browser test has uploaded an image, so the server holds temporary files.
    leftovers_before = list(server.tmpdir.iterdir())
    assert leftovers_before, "the running server should keep its scratch folder (uploads) under TMPDIR"
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0, server.log.read_text()[-3000:]
    assert list(server.tmpdir.iterdir()) == [], f"left behind: {list(server.tmpdir.iterdir())}"


def test_ctrl_c_stops_the_server_and_removes_its_temporary_files(folder, tmp_path):
    """Ctrl-C (SIGINT) stops the server like SIGTERM and the scratch folder goes with it. Who sees the interrupt depends
    on where the main thread is: Gradio's launch loop (it closes the server, exit status 0) or app.py's own handler
    (one "interrupted" line, exit status 130, the shell's convention); both are clean stops."""
    port, tmpdir = free_port(), tmp_path / "tmp"
    tmpdir.mkdir()
    log = tmp_path / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost", TMPDIR=str(tmpdir))
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", str(folder), "--host",
                                    "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                   cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_server(f"http://127.0.0.1:{port}/", process, log)
        assert list(tmpdir.iterdir()), "the running server keeps its scratch folder under TMPDIR"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) in (0, 130), log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=15)
    assert list(tmpdir.iterdir()) == [], f"left behind: {list(tmpdir.iterdir())}"
    assert "Traceback" not in log.read_text()

