"""What `trust_remote_code=True` runs: the three model-repo files import only the standard library, torch,
transformers, PIL and numpy; loading them opens no socket, writes no file, execs nothing and unpickles nothing.
The converter never unpickles arbitrary objects."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from florence_vl.configuration_florence_vl import REMOTE_CODE_FILES

REMOTE_CODE = list(REMOTE_CODE_FILES)
ALLOWED_TOP_LEVEL = {"torch", "transformers", "PIL", "numpy"}
FORBIDDEN_MODULES = {
    "socket", "http", "urllib", "requests", "httpx", "ftplib", "smtplib", "subprocess", "multiprocessing", "pickle",
    "marshal", "shelve", "dill", "ctypes", "importlib", "runpy", "shutil", "tempfile", "huggingface_hub",
}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "open", "system", "popen", "torch.load"}


def parse(name: str) -> ast.Module:
    return ast.parse((ROOT / name).read_text(), filename=name)


def imported_modules(tree: ast.Module) -> set[str]:
    """Top-level names of absolute imports (relative imports stay inside the repo)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def called_names(tree: ast.Module) -> set[str]:
    """Names of everything called: `f(...)` gives f, `a.b.f(...)` gives f and `a.b.f`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
            names.add(ast.unparse(func))
    return names


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_remote_code_imports_only_the_allowed_libraries(name):
    modules = imported_modules(parse(name))
    third_party = modules - set(sys.stdlib_module_names)
    assert third_party <= ALLOWED_TOP_LEVEL, f"{name} imports {sorted(third_party - ALLOWED_TOP_LEVEL)}"
    assert not modules & FORBIDDEN_MODULES, f"{name} imports {sorted(modules & FORBIDDEN_MODULES)}"


@pytest.mark.parametrize("name", ["configuration_florence_vl.py", "modeling_florence_vl.py"])
def test_model_code_calls_no_exec_io_or_deserialisation(name):
    assert not called_names(parse(name)) & FORBIDDEN_CALLS


def test_processor_writes_files_only_when_saving():
    """The only file writes of the remote code are the processor's save_pretrained clean-up of the saved JSON files
    (`make_loadable_by_4x` in the compatibility module, through its `_write`, called by the 5.x processor base's
    save_pretrained)."""
    trees = {name: parse(name) for name in ("processing_florence_vl.py", "compatibility_florence_vl.py")}

    def functions_calling(tree, callee: str) -> set[str]:
        return {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                and any(getattr(c.func, "id", getattr(c.func, "attr", None)) == callee
                        for c in ast.walk(f) if isinstance(c, ast.Call))}

    writers = set()
    for tree in trees.values():
        assert not called_names(tree) & (FORBIDDEN_CALLS - {"open"})
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
                    mode = node.args[1].value if len(node.args) > 1 else "r"
                    if "r" not in mode:
                        writers.add(function.name)
    assert writers == {"_write"}
    assert functions_calling(trees["compatibility_florence_vl.py"], "_write") == {"make_loadable_by_4x"}
    assert functions_calling(trees["compatibility_florence_vl.py"], "make_loadable_by_4x") == {"save_pretrained"}
    assert functions_calling(trees["processing_florence_vl.py"], "make_loadable_by_4x") == set()


def test_converter_never_unpickles_arbitrary_objects():
    tree = parse("convert_checkpoint.py")
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "load"]
    torch_loads = [n for n in loads if getattr(n.func.value, "id", "") == "torch"]
    assert torch_loads, "the converter reads .bin files through torch.load"
    for call in torch_loads:
        flags = {k.arg: getattr(k.value, "value", None) for k in call.keywords}
        assert flags.get("weights_only") is True, ast.unparse(call)
    assert "pickle" not in imported_modules(tree)


class AuditLog:
    """Audit events raised while code from the loaded repo folder is on the stack."""

    WATCHED = ("socket.", "urllib.", "subprocess.", "os.system", "exec", "compile", "pickle.find_class", "open")

    def __init__(self, folder_names: set[str]):
        self.folder_names = folder_names
        self.events: list[tuple[str, str]] = []
        self.active = False

    def __call__(self, event: str, args: tuple) -> None:
        if not self.active or not event.startswith(self.WATCHED):
            return
        if event == "open" and (len(args) < 2 or args[1] is None or "r" in str(args[1]) and "+" not in str(args[1])):
            return  # reading files (the checkpoint, tokenizer, config) is what loading means
        frame = sys._getframe(1)
        if event in ("exec", "compile"):
            # Libraries generate code (dataclasses, torch); only a direct call from our files is ours.
            frame = frame if Path(frame.f_code.co_filename).name in self.folder_names else None
        while frame is not None:
            if frame.f_code.co_filename.startswith("<frozen importlib"):
                return  # the import machinery compiling a module our file imports, not our code's own doing
            if Path(frame.f_code.co_filename).name in self.folder_names:
                self.events.append((event, f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"))
                return
            frame = frame.f_back


_AUDIT = AuditLog(set(REMOTE_CODE))
sys.addaudithook(_AUDIT)  # audit hooks cannot be removed; this one only records while `active`


def test_loading_and_running_the_repo_does_nothing_but_compute(tiny_repo_factory):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tiny_repo_factory("llama")
    _AUDIT.events.clear()
    _AUDIT.active = True
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 30))},
                                                 {"type": "text", "text": "What is it?"}]}]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        _AUDIT.active = False
    assert _AUDIT.events == []
