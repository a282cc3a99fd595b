"""Write a local lmms-eval task, `florence_vl_shapes`, of the embedded model's shapes questions on held-out images.

    python evaluation/make_shapes_task.py OUT [--samples 60] [--seed 424242]

OUT gets the images, `shapes.jsonl`, `florence_vl_shapes.yaml` and the task's hooks (`utils.py`); pass OUT to
lmms-eval's `--include_path` (docs/evaluation.md). The seed is one the embedded model's training never drew from.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import shapes_data  # noqa: E402

TASK_YAML = """task: florence_vl_shapes
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 40  # the off-task sentence
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(out: Path, samples: int, seed: int) -> Path:
    """The task folder at `out` (new or empty); returns its YAML."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty")
    data = shapes_data.write_dataset(out, samples, seed)
    data.rename(out / "shapes.jsonl")
    shutil.copy(Path(__file__).parent / "lmms_eval_shapes" / "utils.py", out / "utils.py")
    yaml = out / "florence_vl_shapes.yaml"
    yaml.write_text(TASK_YAML.format(data=(out / "shapes.jsonl").resolve()))
    return yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--seed", type=int, default=424_242)
    args = parser.parse_args(argv)
    print(write_task(args.out, args.samples, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
