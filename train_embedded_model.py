"""Train the embedded tiny Florence-VL (assets/tiny-florence-vl) on the coloured-shapes task, with finetune.py.

    python train_embedded_model.py [--seed 0]          # about 20 minutes on 2 CPU cores

The release's history in miniature, from seeded random weights of the folder's config (Llama-3 tokenizer and chat
template, a 4-stage DaViT, a 2-layer BART encoder over the three Florence-2 prompts, DBFusion, a 2-layer Llama):
0. Florence-2 pretraining. The releases start from a pretrained Florence-2 (microsoft/Florence-2-large-ft); none
   exists at this size, so its miniature (DaViT, its projection, the BART encoder) first learns to see here: three
   linear heads on the fused depth and breadth features name each image's count, colour and shape (heads discarded
   afterwards), from PyTorch's default initialisation of the tower (see the measurements below), with random flips.
1. finetune.py --stage 1: everything trains on the three questions, the Florence-2 side at a third of the rate of the
   rest (--vision-learning-rate; STAGES).
2. finetune.py --stage 2: Florence-2 frozen, the DBFusion projector and the LLM polish.
It then measures the accuracy per question on freshly drawn held-out images and writes model.safetensors into the
folder only if every question reaches --min-accuracy: the embedded default must not pretend to know what it does not.

The shipped weights are this script's output with seed 0 (its stages run one by one wrote the same file, byte for
byte): 20.1 min from random weights to the trained model (data drawing included), 20.3 min with the held-out
evaluation, on 2 cores; stage 0's heads 99.5% count, 100% colour, 99.9% shape; held-out 100% colour, 99% shape, 93%
count (100 images per question). Re-run on another machine (AMD EPYC, 2 cores, transformers 5.23.0): 16.4 min, stage
0's heads 99.3% / 100% / 99.6%, held-out 100% colour, 99% shape, 95% count, but other weights (a median relative
difference of 42% per tensor): that CPU's kernels round differently and training amplifies it, so across machines the
seed fixes the recipe's draws, not the weights.

The recipe passes for seed 0 but is fragile: which stage-0 model it starts from decides whether the LLM learns colour
and count. Measurements behind it (seed 0 unless said; held-out accuracy, colour / shape / count):
- One learning rate in stage 1 (1e-3 for everything; stage 2 two epochs, no warm-up): colour collapsed to one word
  ("yellow") although stage 0's heads name it perfectly: 25% / 76% / 95%; seed 1: 51% / 99% / 96%. finetune.py's stage
  1 alone learnt colour with --seed 1 and not with 0; a plain PyTorch loop drawing batches with replacement learnt it
  for three sampling seeds: the data order decided.
- From one stage-0 model, the Florence-2 side at 1e-4 in stage 1 (two epochs) gave 95% / 92.5% / 82.5% (40 images per
  question), at 3e-4 100% / 87.5% / 92.5%, and after stage 2 (three epochs, warm-up 50, lr 7e-4) 95% / 97.5% / 90% and
  100% / 97.5% / 95% (100% / 96% / 87% on this script's 100 images per question); stage 2 at lr 3e-4 instead moved
  none by more than one image in 40. Three stage-1 epochs instead of two (STAGES): 100% / 99% / 93%.
- The same recipe from a stage-0 model whose 12,000 images were drawn in another order (same distribution; heads
  99.2% / 100% / 98.8%) failed: 57% / 91% / 78% (two stage-1 epochs). labelled_images keeps the order that works.
- From random weights, finetune.py's two stages alone (no stage 0) learn the answers' prior and little of the image:
  26 min at 768x768 inputs, 33% / 34% / 28%; at 128x128 inputs, 2,500 curriculum steps (colour, + shape, + count)
  68% / 30% / 22%; 1,000 steps whose first half were captions ("two red circles") stayed at the prior.
- The tower is the slow part: with transformers' std-0.02 init a DaViT + linear probe on shape stays at 45-55% after
  1,100 steps, where PyTorch's default init reaches 98% in 600 and a plain 4-layer CNN 99% in 750; stage 0 on 12,000
  images with flips reaches 99-100% on all three in 2,000 steps (12 min).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from shapes_data import (COLOUR_QUESTION, COLOURS, COUNT_QUESTION, COUNT_WORDS, QUESTIONS, SHAPE_QUESTION, SHAPES,
                         Scene, draw_scene, random_scene, write_dataset)

ROOT = Path(__file__).resolve().parent
EMBEDDED_MODEL = ROOT / "assets" / "tiny-florence-vl"
# Stage 0 (Florence-2 pretraining in miniature): images drawn, optimizer steps of 32 images, learning rate.
PRETRAIN = (12000, 2000, 2e-3)
# finetune.py's stages: (stage, samples drawn, its command-line flags). Stage 1 trains the Florence-2 side at a third
# of the rate of the rest: at the full rate, colour collapsed to one word (see the measurements above).
STAGES = (
    (1, 3200, ["--epochs", "3", "--learning-rate", "1e-3", "--vision-learning-rate", "3e-4", "--warmup-steps", "50"]),
    (2, 3200, ["--epochs", "3", "--learning-rate", "7e-4", "--warmup-steps", "50"]),
)
# What stage 0's heads name: one head per question, over its answers (labelled_images' columns, in this order).
HEADS = {COUNT_QUESTION: COUNT_WORDS, COLOUR_QUESTION: tuple(COLOURS), SHAPE_QUESTION: SHAPES}


def chat_batch(processor: Any, images: list, questions: list[str]) -> Any:
    """Model inputs for one-image chats, image i with question i (the processor left-pads the batch)."""
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
             for question in questions]
    prompts = processor.apply_chat_template(chats, add_generation_prompt=True)
    return processor(images=[[image] for image in images], text=prompts, padding=True, return_tensors="pt")


def answers(model: Any, processor: Any, images: list, questions: list[str], batch_size: int = 8) -> list[str]:
    """Greedy one-word answers of `model` to `questions` about `images`, batched."""
    import torch

    replies = []
    for start in range(0, len(images), batch_size):
        inputs = chat_batch(processor, images[start:start + batch_size], questions[start:start + batch_size])
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        replies += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return replies


def held_out_accuracy(model: Any, processor: Any, per_question: int, seed: int) -> dict[str, float]:
    """Accuracy per question on `per_question` freshly drawn images each (seed `seed`, never used for training)."""
    rng = random.Random(seed)
    images, questions, expected = [], [], []
    for question in QUESTIONS:
        for _ in range(per_question):
            scene = random_scene(rng, question)
            images.append(draw_scene(scene, rng))
            questions.append(question)
            expected.append(scene.answer(question))
    replies = answers(model, processor, images, questions)
    right = Counter(q for q, reply, want in zip(questions, replies, expected) if reply.lower() == want)
    return {question: right[question] / per_question for question in QUESTIONS}


def labelled_images(processor: Any, count: int, seed: int) -> tuple[Any, Any]:
    """Pixel values of `count` random scenes (1 to 3 shapes) and the index of each HEADS answer, (count, 3)."""
    import torch

    rng = random.Random(seed)
    # Not random_scene(rng, COUNT_QUESTION): same distribution, but another draw order, with which the recipe failed
    # (see the measurements above).
    scenes = [Scene(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.randint(1, 3)) for _ in range(count)]
    # Drawn and preprocessed a chunk at a time: thousands of full-size images would not fit in memory.
    pixels = torch.cat([processor.image_processor([draw_scene(scene, rng) for scene in scenes[start:start + 256]],
                                                  return_tensors="pt")["pixel_values"]
                        for start in range(0, count, 256)])
    labels = torch.tensor([[words.index(scene.answer(question)) for question, words in HEADS.items()]
                           for scene in scenes])
    return pixels, labels


def pretrain_florence2(folder: Path, images: int, steps: int, learning_rate: float,
                       seed: int) -> tuple[list[float], dict[str, float]]:
    """Stage 0: train the Florence-2 side (DaViT tower, its projection, the BART encoder) to name each image's count,
    colour and shape (three linear heads on the fused depth and breadth features, then discarded), and save the model
    back into `folder`; returns the loss of every step and the heads' accuracy per question on held-out images (one
    image in 16, never trained on)."""
    import math

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finetune import florence2_parameters

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(seed)
    # PyTorch's default (Kaiming-uniform) init: the tower learns shapes several times faster than from std 0.02.
    for module in model.model.vision_tower.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.reset_parameters()

    pixels, labels = labelled_images(processor, images, seed=seed * 100)
    held_out = max(1, images // 16)
    train_pixels, train_labels = pixels[held_out:], labels[held_out:]

    tokens = model.config.image_seq_length
    width = len(model.config.fused_features) * model.config.vision_config.projection_dim
    splits = [len(words) for words in HEADS.values()]
    head = torch.nn.Linear((tokens + 1) * width, sum(splits))

    def logits(batch: torch.Tensor) -> list[torch.Tensor]:
        # The heads read what the DBFusion projector will: depth and breadth features side by side.
        fused = model.model.fuse_features(model.model.get_depth_features(batch).pooler_output)
        # The mean over tokens sees a shape wherever it is; the flattened tokens see where things are (counting).
        return list(head(torch.cat([fused.mean(1), fused.flatten(1)], dim=1)).split(splits, dim=1))

    # Florence-2's side, as finetune.py's stage 2 names it: the tower, its projection and the BART encoder.
    parameters = florence2_parameters(model) + [*head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    warmup = min(30, steps // 5 + 1)  # short runs (the smoke test) train at full rate soon
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        index = torch.randint(0, len(train_pixels), (32,), generator=generator)
        batch = train_pixels[index]
        # Shapes and counts do not change under flips: four times the images for free.
        for dim in (-1, -2):
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(dim), batch)
        loss = sum(torch.nn.functional.cross_entropy(out, train_labels[index, i]) for i, out in enumerate(logits(batch)))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"stage 0 step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        outputs = logits(pixels[:held_out])
    accuracy = {question: (out.argmax(1) == labels[:held_out, i]).float().mean().item()
                for i, (question, out) in enumerate(zip(HEADS, outputs))}
    model.save_pretrained(folder)
    return losses, accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-per-question", type=int, default=100)
    parser.add_argument("--output", type=Path, default=EMBEDDED_MODEL, help="where the trained weights go")
    parser.add_argument("--min-accuracy", type=float, default=0.9, help="held-out accuracy every question must reach")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import finetune
    from ask import materialise_embedded_model

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="florence_vl_train_") as scratch:
        scratch = Path(scratch)
        model = materialise_embedded_model(scratch / "stage0", args.seed, random_weights=True)  # training's start
        images, steps, learning_rate = PRETRAIN
        _, seen = pretrain_florence2(model, images, steps, learning_rate, args.seed)
        for question, value in seen.items():
            print(f"stage 0 heads, held-out accuracy {value:.1%}  {question}")
        for stage, count, flags in STAGES:
            data = write_dataset(scratch / f"data{stage}", count, seed=args.seed * 100 + stage)
            output = scratch / f"stage{stage}"
            finetune.train(finetune.parse_args([
                "--model", str(model), "--data", str(data), "--output-dir", str(output), "--stage", str(stage),
                "--batch-size", str(args.batch_size), "--lr-scheduler", "cosine", "--seed", str(args.seed),
                "--device", "cpu", "--dtype", "float32", "--no-gradient-checkpointing", "--save-steps", "0", *flags,
            ]), str(model))
            model = output
        minutes = (time.time() - started) / 60
        trained = AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
        torch.manual_seed(0)
        accuracy = held_out_accuracy(trained, processor, args.eval_per_question, seed=10_000 + args.seed)
        print(f"trained in {minutes:.1f} min on {torch.get_num_threads()} threads")
        for question, value in accuracy.items():
            print(f"held-out accuracy {value:.1%}  {question}")
        if min(accuracy.values()) < args.min_accuracy:
            print(f"error: below --min-accuracy {args.min_accuracy:.0%}: weights NOT written", file=sys.stderr)
            return 1
        args.output.mkdir(parents=True, exist_ok=True)
        shutil.copy(model / "model.safetensors", args.output / "model.safetensors.partial")
        os.chmod(args.output / "model.safetensors.partial", 0o644)
        (args.output / "model.safetensors.partial").replace(args.output / "model.safetensors")
    print(f"weights written to {args.output / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
