"""What every command-line script of this repo shares: the same --device/--dtype options, paths resolved against the
caller's working directory, a model argument that is a folder or a Hub id, and one `error:` line for expected mistakes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_NEW_TOKENS = 256  # one default everywhere: long enough for a real release's detailed answer


def register_model_package() -> None:
    """Make the repo root importable as the package `florence_vl`: the model files import each other relatively, as
    remote code must. The one way tools and tests import them."""
    if "florence_vl" not in sys.modules:
        package = types.ModuleType("florence_vl")
        package.__path__ = [str(ROOT)]
        sys.modules["florence_vl"] = package


class UsageError(ValueError):
    """An expected mistake (missing file, bad option value): reported as one `error:` line, no traceback."""


class ScriptParser(argparse.ArgumentParser):
    """argparse's parser, with a usage mistake reported as one `error:` line naming the command the user ran
    (`ask.sh` runs `ask.py` and names itself in FLORENCE_VL_COMMAND)."""

    def __init__(self, **kwargs: Any):
        super().__init__(prog=os.environ.get("FLORENCE_VL_COMMAND") or None, **kwargs)

    def error(self, message: str) -> "NoReturn":  # noqa: F821
        """Exit 2 with `error: MESSAGE` alone (no usage block)."""
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, spelled and defaulted the same in every script."""
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights' dtype (auto: bfloat16 on CUDA, float32 on CPU; bfloat16 pays on CPUs with AMX only)")


def resolve_device(device: Optional[str]) -> str:
    """The device to run on: the given one, else cuda when available, else cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    return device


def resolve_dtype(dtype: str, device: str) -> "torch.dtype":  # noqa: F821
    """The torch dtype for `--dtype` on `device` (auto: bfloat16 on CUDA, float32 elsewhere)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def user_path(path: str | os.PathLike) -> Path:
    """`path` as the user meant it: `~` expanded, relative to the directory the command was started from."""
    return Path(os.path.abspath(os.path.expanduser(path)))  # `..` resolved, links kept


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` can be a Hub repo id ("owner/name"), not a path: what is neither is a missing folder."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and "\\" not in name


def resolve_model(model: str) -> str:
    """A converted local folder (made absolute) or a Hub id ("owner/name") that the Hub (or, offline, its local cache)
    knows; a missing folder, an original release and anything else is a UsageError, after at most one Hub request."""
    local = user_path(model)
    if local.is_dir():
        return check_model_folder(model, local)
    if local.exists():
        raise UsageError(f"--model {model}: {local} is a file, not a model folder")
    if not looks_like_hub_id(model) or user_path(model.split("/")[0]).is_dir():
        raise UsageError(f"--model {model}: no such folder ({local})")
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        huggingface_hub.model_info(model, timeout=10)
    except GatedRepoError:
        return model  # it exists; transformers says what access it needs
    except RepositoryNotFoundError:
        raise UsageError(f"--model {model}: no such folder ({local}), nor a model of that id on the Hub") from None
    except OfflineModeIsEnabled:
        if huggingface_hub.try_to_load_from_cache(model, "config.json") is None:
            raise UsageError(f"--model {model}: no such folder ({local}), and the Hub is off (HF_HUB_OFFLINE) with "
                             f"no cached copy of that id") from None
    except Exception as error:  # the network: no route, DNS, timeout
        raise UsageError(f"--model {model}: no such folder ({local}), and the Hub could not be asked about that id "
                         f"({type(error).__name__}: {first_line(error)})") from None
    return model


def check_model_folder(model: str, local: Path) -> str:
    """`local` if it holds a converted Florence-VL model; a UsageError saying what it holds instead."""
    if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        raise UsageError(f"--model {model}: {local} is a LoRA adapter alone; give the folder finetune.py merged it "
                         f"into ({local.parent}), or load it onto its base with peft's PeftModel.from_pretrained")
    if not (local / "config.json").is_file():
        raise UsageError(f"--model {model}: {local} has no config.json (not a converted Florence-VL folder)")
    model_type = json.loads((local / "config.json").read_text()).get("model_type")
    if model_type in ("llava_llama", "llava_phi"):
        raise UsageError(f"--model {model}: {local} is an original Florence-VL release (model_type {model_type}); "
                         f"convert it first: python convert_checkpoint.py {model} OUT, then --model OUT")
    if model_type != "florence_vl":
        raise UsageError(f"--model {model}: {local} holds a {model_type!r} model, not Florence-VL (florence_vl)")
    return str(local)


def first_line(error: BaseException) -> str:
    """An exception's message for one `error:` line: its first line, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_url(source: str) -> bool:
    """Whether an image source is an http(s) URL (fetched) rather than a file path."""
    return source.startswith(("http://", "https://"))


def read_image(source: str, path: Optional[Path] = None) -> Any:
    """An RGB PIL image from a URL (fetched now) or the file at `path` (default: `source`); ValueError says why not."""
    from PIL import Image, UnidentifiedImageError

    if is_url(source):
        from transformers.image_utils import load_image

        try:
            return load_image(source, timeout=10).convert("RGB")
        except Exception as error:  # httpx/requests errors, HTTP status errors, or bytes that are not an image
            raise ValueError(f"could not fetch an image there ({first_line(error)})") from None
    path = path or Path(source)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise ValueError(f"no such file ({path})")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"not an image file ({error})") from None


def resolve_image(image: str) -> Any:
    """The --image argument, read now (before any model loads): a URL, or a file relative to the caller's directory;
    a missing, unreachable or non-image source is a UsageError naming it."""
    try:
        return read_image(image, None if is_url(image) else user_path(image))
    except ValueError as error:
        raise UsageError(f"--image {image}: {error}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (for --max-new-tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def prepare_output_dir(path: Path, overwrite: bool) -> Path:
    """The output folder: must be new or empty unless --overwrite, so that no earlier result is silently replaced."""
    path = user_path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UsageError(f"output folder {path} exists and is not empty (choose another or pass --overwrite)")
    return path


def quiet_libraries() -> None:
    """Silence the notices a plain run does not need: transformers' info/warnings and its progress bars for loading."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # The Trainer's checkpoint rotation on filesystems with coarse timestamps (it falls back to step order, which is
    # what finetune.py wants anyway), and bitsandbytes' note on CPUs with AVX512-BF16 that an optional kernel package
    # is missing (it falls back to its own kernel).
    warnings.filterwarnings("ignore", message="mtime may not be reliable", category=UserWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def run(main: Callable[[], int]) -> int:
    """Run a script's main: expected mistakes print one `error: ...` line and exit 2 instead of a traceback."""
    try:
        return main()
    except (UsageError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a Hub id that cannot be reached or does not exist
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
