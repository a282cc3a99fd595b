"""Train the embedded tiny Florence-VL (assets/tiny-florence-vl) on the coloured-shapes task, with finetune.py.

    python train_embedded_model.py [--seed 0]          # about 28 minutes on 2 CPU cores (see below)

The release's history in miniature, from seeded random weights of the folder's config (Llama-3 tokenizer and chat
template, a 4-stage DaViT, a 2-layer BART encoder over the three Florence-2 prompts, DBFusion, a 2-layer Llama):
0. Florence-2 pretraining. The releases start from a pretrained Florence-2 (microsoft/Florence-2-large-ft); none
   exists at this size, so its miniature (DaViT, its projection, the BART encoder) first learns to see here: three
   linear heads on the fused depth and breadth features name each image's count, colour and shape (heads discarded
   afterwards; shape, the hard one, weighs twice in the loss), from PyTorch's default initialisation of the tower
   (see the measurements below), with random flips.
1. finetune.py --stage 1: everything trains on every wording of shapes_data.WORDINGS (off-task questions and their
   fixed sentence included), the Florence-2 side at a tenth of the rate of the rest (--vision-learning-rate; STAGES).
2. finetune.py --stage 2: Florence-2 frozen, the DBFusion projector and the LLM polish.
3. finetune.py --stage 1 again, one short epoch: what stage 2 leaves weakest asked more often (counts of a kind, which
   need the shape and "zero"; off-task questions shaped like the task's), 40% of the images strips of 1:2.5 to 1:8.
Images are drawn by WORKERS processes, seeded per chunk (the same images whatever the number of processes). The
script then measures the accuracy per wording family on freshly drawn held-out images and writes model.safetensors
into the folder only if every family reaches --min-accuracy: the embedded default must not pretend to know what it
does not.

The shipped weights are this recipe's output with seed 0 (transformers 5.23.0, AMD EPYC, 2 quiet cores). The same recipe
with off-task in 19% of stage 3's samples ran end to end in 28.1 min, and its stage 3 run alone on an earlier run's
stages 0-2 (same losses) gave its weights bit for bit: the shipped stage 3 (off-task in 24%, the same 313 steps) was run
that way. Stage 0's heads: 98.1% count, 99.9% colour, 98.3% shape. Held-out, on the task's images
(shapes_data.MIN_SHAPE and MIN_GAP): 96.7-100% per family at 60 questions per family (seed 10,000), 95-100% at 100
(the tests' seed; counts of squares 95%) and 96-100% at 100 (seed 31,337); tests/other_drawing.py's images 98.5-100%.
On images drawn as training draws them (TRAINING_BOUNDS: smaller and closer shapes too) 91.7-100% and 94-100%.

What the recipe rests on (seed 0 unless said):
- Training time is stage 0's: per optimizer step on 2 cores, stage 0 0.6 s (32 images), finetune.py's stage 1
  0.59 s and stage 2 0.42 s (16 samples each); drawing 12,000 full-size images takes about 2 minutes with 2 processes.
- Understanding the wordings is not the hard part (colour and off-task are right in every family); seeing shapes in
  strips is, and stage 1 is needed. A run with stage 2 only (5,120 samples, 2 epochs, 1e-3) after a shorter stage 0
  (1,800 steps, 4,000 extra strips in its second half), a quarter of stage 2's images strips: 30.3 min (5 of them
  shared with a duplicate run); stage 0's heads 98.5% count, 100% colour, 93.5% shape (strips cost the task's own
  images 2 points); held-out colour 79-86%, shape 77-81%, counts of a kind 50-70%, count 96.7%, off-task 100%.
- Strips mixed into stage 0 from its first step (a quarter of 12,000 images, shapes at least 0.2 of the short side,
  1,700 steps) stalled it: the loss stayed at 2.5-2.8 (chance: 3.6; colour alone learnt) up to step 1,000, where the
  shipped run was at 0.4.
- Colour is fragile when it is asked rarely and the tower trains with the LLM: a run whose stage 1 trained Florence-2
  on 256-px images with colour in 15% of the samples ended with colour collapsed to one word (27%); the shipped recipe
  asks it in a fifth (shapes_data.KIND_WEIGHTS), the tower at a tenth of the LLM's rate.
- Small shapes: on earlier weights, shape questions were 60% right on shapes under 10 px of the 128-px view and 96.8%
  above, hence no shape under 8% of the image's long side (TRAINING_BOUNDS) and shape's loss weighted twice in
  stage 0 (HEADS_WEIGHTS): its shape head went from 95.7% to 98.3%. On the shipped weights, counts of two or three
  shapes were 82-90% right with a shape under 11% of the long side and 98.7% above (536 questions, two seeds), and 5
  of 9 wrong with gaps under 3 px of the view: hence the task's bounds, shapes_data.MIN_SHAPE and MIN_GAP (14 px and
  4 px of the view). Drawing the training images within those bounds too stalled stage 0 at chance (loss 4.4-4.8 up
  to step 1,100, where the shipped run was at 0.55): training keeps drawing beyond them.
- Stage 3's mix, from the same stages 0-2 (the task's images; tests' seed / seed 10,000 / seed 31,337, lowest family):
  as shipped 95.0 / 96.7 / 96.0%; counts in 19% of the samples (weight 0.3) 97.0 / 96.7 / 97.0%, but "Is it raining?"
  got a broken sentence; that with off-task raised back to 24% 97.0 / 93.3% and the example image's count wrong;
  60% strips 97.0 / 95.0 / 97.0%. Single runs move the lowest family by about 2 points either way.
- Stage 3: after stages 0-2 alone (22.2 min) held-out shape was 95-100% and counts of a kind 91.7-95%, counts of a kind
  on 1:2.5-1:4 strips 85% (tests' seed) and "Is it raining?" (never trained) got a broken sentence ("I oncir, shape
  ..."). Short polishes of that model, measured on held-out seeds: stage 2 with off-task in a quarter of the samples
  fixed the sentence but not strips; adding 40% strips fixed neither; counts of a kind in 38% of the samples, off-task
  in 19%, 40% strips: stage 2 reached 88% on the strips, stage 1 (tower at 1e-4) 89% on the tests' 75 questions and
  96-97% on 180 of another seed. With off-task in 19% the sentence broke again on that question (3 of 3 images); in 24%,
  as shipped, it did not. Which unseen question breaks depends on the run: the test guards it.
- Colour's binding is fragile in the projector and LLM, not in the tower: with stage 0 reproduced bit for bit and only
  stages 1-2's question mix changed (colour in 18%, 4,800 samples per stage), colour fell to 86.7-93.3%; with off-task
  in 12% and counts of a kind in 30%, to 45-52% (two colours left), and to 35-57% with Florence-2 nearly frozen in
  stage 1 (1e-5), while stage 0's heads read colour at 99.9% from the same features. With 20,000 images and 2,400
  steps, stage 0 stayed above loss 2 to step 1,100 and ended at 88.6% count, 89.9% shape: the plateau it must escape
  first depends on the images drawn.
- Counts of a kind need "zero" and the shape together: with them in a sixth of the samples, "How many circles are
  there?" about squares got the number of squares (78% on circles and squares); at a third of the samples, 95%.
- Stage 0 sees the images exactly as the model does, padded to a square (processor.preprocess_images). An earlier
  version fed it the image processor's output without the padding, i.e. stretched to the square: its heads then scored
  98.5-100%, but the LLM stages read the padded view, and colour collapsed to one word after both stages (25% / 60% /
  84% colour / shape / count), as it did with the tower frozen from the start (15% / 38% / 58%).
- Images with each side drawn on its own (100 to 1000 px) rather than aspect ratios spread evenly up to 1:10 (40% of
  them beyond 1:4): with the latter, stage 0's heads reached 74% on shape, with the former 96.8%.
- From random weights, finetune.py's stages alone (no stage 0) learn the answers' prior and little of the image:
  26 min at 768x768 inputs, 33% / 34% / 28%; 1,000 steps whose first half were captions ("two red circles") stayed at
  the prior.
- The tower is the slow part: with transformers' std-0.02 init a DaViT + linear probe on shape stays at 45-55% after
  1,100 steps, where PyTorch's default init reaches 98% in 600 and a plain 4-layer CNN 99% in 750.
- Stage 1 with Florence-2 at the rate of the rest made colour collapse to one word; at a third of it (or less) it did
  not (measured with the stretched stage 0 above).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

from shapes_data import (COLOURS, COUNT_WORDS, FAMILIES, KIND_WEIGHTS, SHAPES, TRAINING_BOUNDS, draw_scene,
                         random_question, random_scene, write_dataset)

ROOT = Path(__file__).resolve().parent
EMBEDDED_MODEL = ROOT / "assets" / "tiny-florence-vl"
# Stage 0 (Florence-2 pretraining in miniature): images drawn, optimizer steps of 32 images, learning rate.
PRETRAIN = (16000, 2100, 2e-3)
# finetune.py's stages: (stage, samples drawn, how they are drawn (shapes_data.write_dataset's weights and strips),
# its command-line flags). Stage 1 trains the Florence-2 side at a tenth of the rate of the rest, so that gradients
# through the untrained projector and LLM do not undo stage 0. The last, short one polishes what is still weak after
# stage 2 (counts of a kind in strips, off-task wordings shaped like the task's): those asked more often (KIND_WEIGHTS
# with them raised: 35% and 24% of the samples), 40% strips.
HARD_QUESTIONS = {**KIND_WEIGHTS, "count of a kind": 0.5, "off-task": 0.35}
STAGES = (
    (1, 4000, {},
     ["--epochs", "2", "--learning-rate", "1e-3", "--vision-learning-rate", "1e-4", "--warmup-steps", "50"]),
    (2, 4000, {}, ["--epochs", "2", "--learning-rate", "7e-4", "--warmup-steps", "50"]),
    (1, 5000, {"weights": HARD_QUESTIONS, "strips": 0.4},
     ["--epochs", "1", "--learning-rate", "3e-4", "--vision-learning-rate", "1e-4", "--warmup-steps", "20"]),
)
# What stage 0's heads name: one head per attribute of the scene, over its values (labelled_images' columns).
HEADS = {"count": COUNT_WORDS, "colour": tuple(COLOURS), "shape": SHAPES}
HEADS_WEIGHTS = (1.0, 1.0, 2.0)  # shape is the hard one (small shapes in strips): twice the weight in the loss
SAVED_SIDE = 256  # finetune.py's images are saved at most this large: the model sees 128 px, PNGs write faster
MAX_ANSWER_TOKENS = 40  # the longest answer is the off-task sentence
WORKERS = 2  # drawing processes: drawing thousands of images is CPU-bound


def chat_batch(processor: Any, images: list, questions: list[str]) -> Any:
    """Model inputs for one-image chats, image i with question i (the processor left-pads the batch)."""
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
             for question in questions]
    prompts = processor.apply_chat_template(chats, add_generation_prompt=True)
    return processor(images=[[image] for image in images], text=prompts, padding=True, return_tensors="pt")


def answers(model: Any, processor: Any, images: list, questions: list[str], batch_size: int = 8) -> list[str]:
    """Greedy answers of `model` to `questions` about `images`, batched."""
    import torch

    replies = []
    for start in range(0, len(images), batch_size):
        inputs = chat_batch(processor, images[start:start + batch_size], questions[start:start + batch_size])
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        replies += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return replies


def held_out_replies(model: Any, processor: Any, per_family: int, seed: int,
                     draw: Callable[..., Any] = draw_scene,
                     size: Callable[[random.Random], tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """The model's replies to `per_family` random wordings of every family of WORDINGS, each about a freshly drawn
    image (seed `seed`, never used for training; `draw(scene, rng, size=...)` draws it, of the task's random sizes or
    of `size(rng)`): one record per question with its kind, family, scene, question, expected answer and reply."""
    rng = random.Random(seed)
    records, images = [], []
    for family in FAMILIES:
        for _ in range(per_family):
            question = random_question(rng, family)
            scene = random_scene(rng, question)
            images.append(draw(scene, rng, size=size(rng) if size else None))
            records.append({"kind": family[0], "family": family[1], "scene": scene, "question": question,
                            "expected": scene.answer(question)})
    replies = answers(model, processor, images, [record["question"] for record in records])
    for record, reply in zip(records, replies):
        record["reply"] = reply
    return records


def accuracy(records: list[dict[str, Any]], by: Callable[[dict[str, Any]], Any]) -> dict[Any, float]:
    """The share of right replies in `records` (exact answers, case aside), grouped by `by(record)`."""
    total, right = Counter(), Counter()
    for record in records:
        total[by(record)] += 1
        right[by(record)] += record["reply"].lower() == record["expected"].lower()
    return {group: right[group] / total[group] for group in total}


def by_family(record: dict[str, Any]) -> tuple[str, str]:
    """Group records by (kind, wording family)."""
    return record["kind"], record["family"]


def by_kind(record: dict[str, Any]) -> str:
    """Group records by kind of question."""
    return record["kind"]


def seeded_chunks(count: int, seed: int, chunks: int) -> list[tuple[int, int]]:
    """`count` split into `chunks` near-equal non-empty parts, each with its own seed: (size, seed) pairs whose images
    do not depend on how many processes draw them."""
    sizes = [count // chunks + (index < count % chunks) for index in range(chunks)]
    return [(size, seed * 1000 + index) for index, size in enumerate(sizes) if size]


def in_workers(function: Callable[[Any], Any], jobs: list) -> list:
    """`function` of each job, in order, run by WORKERS spawned processes (drawing is CPU-bound)."""
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(function, jobs))


def _labelled_chunk(job: tuple[str, int, int]) -> tuple[Any, Any]:
    """Pixel values and HEADS labels of `count` random scenes of 1 to 3 shapes drawn with seed `seed`, preprocessed
    by the processor in `folder` (a worker process's share of labelled_images)."""
    import torch
    from transformers import AutoProcessor

    folder, count, seed = job
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    # Drawn and preprocessed a few at a time: thousands of full-size images would not fit in memory. The model's own
    # preprocessing (square padding included): stage 0 must see the images as the model will.
    pixels = torch.cat([processor(images=[draw_scene(scene, rng, **TRAINING_BOUNDS)
                                          for scene in scenes[start:start + 64]],
                                  return_tensors="pt")["pixel_values"] for start in range(0, count, 64)])
    labels = torch.tensor([[scene.count - 1, list(COLOURS).index(scene.colour), SHAPES.index(scene.shape)]
                           for scene in scenes])  # HEADS' order
    return pixels, labels


def labelled_images(folder: Path, count: int, seed: int, chunks: int = 16) -> tuple[Any, Any]:
    """Pixel values of `count` random scenes (1 to 3 shapes) and the index of each HEADS answer, (count, 3), drawn by
    WORKERS processes in `chunks` seeded chunks (the same images whatever the number of processes)."""
    import torch

    parts = in_workers(_labelled_chunk, [(str(folder), size, chunk_seed) for size, chunk_seed in
                                         seeded_chunks(count, seed, chunks)])
    return torch.cat([pixels for pixels, _ in parts]), torch.cat([labels for _, labels in parts])


def _dataset_chunk(job: tuple[str, int, int, dict[str, Any]]) -> str:
    folder, count, seed, how = job
    return str(write_dataset(Path(folder), count, seed, max_side=SAVED_SIDE, **how))


def write_training_data(folder: Path, count: int, seed: int, how: dict[str, Any] | None = None,
                        chunks: int = 8) -> Path:
    """finetune.py's samples.jsonl of `count` random samples in `folder` (drawn as `how` says: write_dataset's
    keyword arguments), by WORKERS processes in `chunks` seeded chunks (one sub-folder each)."""
    jobs = [(str(folder / f"part{index}"), size, chunk_seed, how or {})
            for index, (size, chunk_seed) in enumerate(seeded_chunks(count, seed, chunks))]
    parts = [Path(path) for path in in_workers(_dataset_chunk, jobs)]
    lines = []
    for part in parts:
        for line in part.read_text().splitlines():
            sample = json.loads(line)
            sample["image"] = f"{part.parent.name}/{sample['image']}"  # paths are relative to the JSONL file
            lines.append(json.dumps(sample))
    path = folder / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def pretrain_florence2(folder: Path, images: int, steps: int, learning_rate: float,
                       seed: int) -> tuple[list[float], dict[str, float]]:
    """Stage 0: train the Florence-2 side (DaViT tower, its projection, the BART encoder) to name each image's count,
    colour and shape (three linear heads on the fused depth and breadth features, then discarded), and save the model
    back into `folder`; returns the loss of every step and the heads' accuracy per question on held-out images (one
    image in 16, never trained on)."""
    import math

    import torch
    from transformers import AutoModelForImageTextToText

    from finetune import florence2_parameters

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(seed)
    # PyTorch's default (Kaiming-uniform) init: the tower learns shapes several times faster than from std 0.02.
    for module in model.model.vision_tower.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.reset_parameters()

    pixels, labels = labelled_images(folder, images, seed=seed * 100)
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
        loss = sum(weight * torch.nn.functional.cross_entropy(out, train_labels[index, i])
                   for i, (out, weight) in enumerate(zip(logits(batch), HEADS_WEIGHTS)))
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
    accuracy = {head: (out.argmax(1) == labels[:held_out, i]).float().mean().item()
                for i, (head, out) in enumerate(zip(HEADS, outputs))}
    model.save_pretrained(folder)
    return losses, accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-per-family", type=int, default=60, help="held-out questions per wording family")
    parser.add_argument("--output", type=Path, default=EMBEDDED_MODEL, help="where the trained weights go")
    parser.add_argument("--min-accuracy", type=float, default=0.95,
                        help="held-out accuracy every wording family must reach (issue 28's bar)")
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
        for head, value in seen.items():
            print(f"stage 0 heads, held-out accuracy {value:.1%}  {head}", flush=True)
        for step, (stage, count, how, flags) in enumerate(STAGES, start=1):
            data = write_training_data(scratch / f"data{step}", count, seed=args.seed * 100 + step, how=how)
            output = scratch / f"step{step}"
            finetune.train(finetune.parse_args([
                "--model", str(model), "--data", str(data), "--output-dir", str(output), "--stage", str(stage),
                "--batch-size", str(args.batch_size), "--lr-scheduler", "cosine", "--seed", str(args.seed),
                "--device", "cpu", "--dtype", "float32", "--no-gradient-checkpointing", "--save-steps", "0", *flags,
            ]), str(model))
            model = output
        minutes = (time.time() - started) / 60
        print(f"trained in {minutes:.1f} min on {torch.get_num_threads()} threads", flush=True)
        trained = AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
        torch.manual_seed(0)
        records = held_out_replies(trained, processor, args.eval_per_family, seed=10_000 + args.seed)
        scores = accuracy(records, by_family)
        for (kind, family), value in scores.items():
            print(f"held-out accuracy {value:.1%}  {kind}: {family}")
        mistakes = Counter((record["kind"], record["scene"], record["expected"], record["reply"][:30])
                           for record in records if record["reply"].lower() != record["expected"].lower())
        for mistake, times in mistakes.most_common(12):
            print(f"  {times} x {mistake}")
        print(f"evaluated in {(time.time() - started) / 60 - minutes:.1f} min")
        if min(scores.values()) < args.min_accuracy:
            print(f"error: below --min-accuracy {args.min_accuracy:.0%}: weights NOT written", file=sys.stderr)
            return 1
        if args.output.resolve() == EMBEDDED_MODEL.resolve():
            # The shipped folder keeps its card and processor: its weights change, whole or not at all, and its code
            # files are refreshed from the root's.
            from model_folder import copy_remote_code

            copy_remote_code(args.output)
            shutil.copy(model / "model.safetensors", args.output / "model.safetensors.partial")
            os.chmod(args.output / "model.safetensors.partial", 0o644)
            (args.output / "model.safetensors.partial").replace(args.output / "model.safetensors")
        else:  # a folder of its own: finetune.py's complete output, with this training's card
            from model_folder import derived_card, write_model_folder

            shutil.copytree(model, args.output, dirs_exist_ok=True)
            kinds = accuracy(records, by_kind)
            what = f"Trained from random weights by train_embedded_model.py (seed {args.seed}); held-out accuracy: " + (
                ", ".join(f"{value:.0%} for {kind} questions" for kind, value in kinds.items()))
            write_model_folder(args.output, processor, derived_card(str(EMBEDDED_MODEL), "Florence-VL tiny", what))
    print(f"weights written to {args.output / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
