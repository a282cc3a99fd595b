"""Memory needed by the real Florence-VL releases, computed (not measured) from their tensor manifests.

    python benchmarks/memory_table.py        # prints the Markdown table that docs/memory.md shows

The converted model is built on the meta device from each release's config (benchmarks/real_releases.json) and the
Florence-2 tower shapes in ../shared/fixtures/real_size_manifests.json; its parameter count is checked against the
converter's plan of the manifest. Bytes per storage format and what is counted: memory_footprint.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli_common import register_model_package  # noqa: E402
from memory_footprint import Footprint, config_footprint, table  # noqa: E402

SHARED = Path(os.environ.get("FLORENCE_VL_SHARED", ROOT.parent / "shared"))
MANIFESTS = SHARED / "fixtures" / "real_size_manifests.json"
RELEASES = ROOT / "benchmarks" / "real_releases.json"
NAMES = {"florence_vl_8b_llava_llama": "Florence-VL 8B (Llama-3.1)", "florence_vl_3b_llava_phi": "Florence-VL 3B (Phi-3.5)"}


def release_footprint(release_name: str) -> Footprint:
    """The footprint of a real release, its config rebuilt from the manifest and checked against the converter's plan."""
    register_model_package()
    import convert_checkpoint as cc
    from florence_vl.configuration_florence_vl import RELEASE_IMAGE_TOKEN_IDS

    manifest = json.loads(MANIFESTS.read_text())[release_name]
    release = json.loads(RELEASES.read_text())[release_name]
    tensors = cc.inventory_from_manifest(manifest)
    tower = {t.name: t.shape for t in tensors if t.name.startswith(cc.TOWER_PREFIX)}
    llm = cc.SUPPORTED[release["model_type"]][0]
    config = cc.build_config(release, *cc.infer_vision_configs(tower), RELEASE_IMAGE_TOKEN_IDS[llm])
    plan = cc.build_plan(tensors, *cc.target_shapes(config))
    result = config_footprint(config, NAMES[release_name])
    mapped = sum(p.source.numel for p in plan.mapped)
    if result.quantized_params + result.kept_params != mapped:
        raise RuntimeError(f"{release_name}: the model holds {result.quantized_params + result.kept_params:,} "
                           f"values, the release maps {mapped:,}")
    return result



if __name__ == "__main__":
    print(table([release_footprint(name) for name in NAMES]))
