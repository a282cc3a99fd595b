"""benchmarks/real_size.py, the real-size check, run end to end at the tiny size (the same code scripts/real_size_check.sh
runs at the real size): releases written in the original format, converted (and killed mid-run), loaded and generated
from (the 8B-style one offloaded to disk), the real rope settings checked under this version and the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, require_fixture

OTHER_PYTHON = os.environ.get("FLORENCE_VL_OTHER_PYTHON")


def test_the_real_size_check_passes_at_the_tiny_size(tmp_path):
    require_fixture()
    figures_file = tmp_path / "figures.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "real_size.py"), "--size", "tiny", "--json", str(figures_file),
               "--work", str(tmp_path / "work")]
    if OTHER_PYTHON:
        command += ["--other-python", OTHER_PYTHON]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "[FAIL]" not in result.stdout
    figures = json.loads(figures_file.read_text())
    # What the printed checks say, read back from the figures.
    assert figures["3b"]["text"] == figures["3b"]["pipeline_text"] and len(figures["3b"]["tokens"]) == 4
    assert figures["3b"]["image_changes_logits"] > 0
    assert figures["3b"]["prompt_ids"][0] != 1  # the synthetic Phi-3.5 tokenizer adds no <s>: the rule was read
    assert "disk" in figures["8b"]["device_map"] and figures["8b"]["new_tokens"] == 4
    assert figures["8b"]["shards"] > 1 and figures["8b"]["convert_rss"] > 0
    for key, length in (("8b", 8704), ("3b", 4608)):
        runs = figures[f"rope_{key}"]
        assert set(runs) == ({"here", "other"} if OTHER_PYTHON else {"here"})
        for run in runs.values():
            assert run["length"] == length and run["model_vs_llm"] <= 1e-4 < run["llm_vs_unscaled"]
    assert figures["rope_8b"]["here"]["rope"]["rope_type"] == "llama3"
    assert figures["rope_3b"]["here"]["rope_lists"] == {"long_factor": 48, "short_factor": 48}
    # The work folder given is kept (the default temporary one is removed); nothing of a conversion is left in it.
    assert not list((tmp_path / "work").glob(".*.partial"))
    assert figures["peak_disk"] > 0 and "peak disk use" in result.stdout
