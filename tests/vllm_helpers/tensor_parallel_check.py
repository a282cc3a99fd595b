"""Run by tests/test_vllm.py in its own process: vLLM with tensor_parallel_size=N on FOLDER; prints one JSON line with,
per rank, the largest difference of its image features from transformers' (same pixels), and the greedy tokens of
the fixture's first case (on the line starting with REPORT).

    python tests/vllm_helpers/tensor_parallel_check.py FOLDER N
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PIXELS_SEED = 0
REPORT = "TENSOR_PARALLEL_REPORT "  # prefix of the result line (vLLM logs to stdout as well)


def image_features(model: torch.nn.Module) -> torch.Tensor:
    """get_image_features(...).pooler_output of two seeded random images (runs inside each vLLM worker too)."""
    base = model.model  # FlorenceVLModel, under transformers' generation class and under vLLM's wrapper alike
    side = round((base.config.image_seq_length - 1) ** 0.5) * 32  # the DaViT's total stride is 32
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(PIXELS_SEED))
    with torch.no_grad():
        return base.get_image_features(pixels.to(base.dtype), return_dict=True).pooler_output.float().cpu()


def main(folder: str, tensor_parallel_size: int, image: str, question: str) -> None:
    import vllm
    from PIL import Image
    from tensor_parallel_check import image_features  # by module name: vLLM pickles it to its workers
    from transformers import AutoModelForImageTextToText

    reference = image_features(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval())
    llm = vllm.LLM(model=folder, trust_remote_code=True, model_impl="transformers", dtype="float32",
                   max_model_len=512, enforce_eager=True, seed=0, tensor_parallel_size=tensor_parallel_size,
                   distributed_executor_backend="mp")
    per_rank = [float((features - reference).abs().max()) for features in llm.apply_model(image_features)]
    chat = [{"role": "user", "content": [{"type": "image_pil", "image_pil": Image.open(image)},
                                         {"type": "text", "text": question}]}]
    (output,) = llm.chat([chat], vllm.SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)
    print(REPORT + json.dumps({"feature_diff_per_rank": per_rank, "feature_scale": float(reference.abs().max()),
                      "prompt_ids": list(output.prompt_token_ids), "tokens": list(output.outputs[0].token_ids)}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the workers need PYTHONPATH to hold it as well
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
