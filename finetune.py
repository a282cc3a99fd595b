"""Fine-tune Florence-VL on image-question-answer samples with the paper's two-stage recipe (transformers Trainer).

    python finetune.py --model MODEL --data samples.jsonl --output-dir out --stage 2 [--lora]
    accelerate launch [--config_file fsdp.yaml] finetune.py ...      # several GPUs or processes, same code

--stage 1 trains the whole model; --stage 2 freezes the Florence-2 tower (DaViT tower, its projection and the BART
encoder that computes the breadth features) and trains the DBFusion projector and the LLM. --lora trains LoRA adapters
on the LLM's attention projections instead of the LLM (and, in stage 2, the whole DBFusion projector). Labels come from
the model's own chat template: only the answers and the end-of-turn token after each are trained.

The data file is JSON (a list) or JSONL of samples in any of three layouts (see load_samples): {"image", "question",
"answer"}; LLaVA's {"image", "conversations": [{"from": "human", "value": "<image>\n..."}, {"from": "gpt", ...}]},
several turns, the image optional; Hugging Face datasets' {"messages", "images"}. Image paths are relative to the file.
Without --model it fine-tunes the embedded tiny model (assets/tiny-florence-vl, trained on coloured shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from cli_common import (ScriptParser, UsageError, add_runtime_args, is_url, prepare_output_dir, quiet_libraries,
                        read_image, register_model_package, resolve_device, resolve_dtype, resolve_model, run,
                        user_path)

ROOT = Path(__file__).resolve().parent
IGNORE_INDEX = -100
# The Florence-2 side of the model: frozen in stage 2 (the paper's instruction-tuning stage).
TOWER_MODULES = ("vision_tower", "vision_projector", "breadth_encoder")
# LLM attention projections for LoRA: Llama's q/k/v/o, Phi-3's fused qkv and o.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|qkv_proj)$"


def load_samples(path: Path) -> list[dict[str, Any]]:
    """The samples of a JSON list or JSONL file as chat `messages` (content blocks) and their `images` (paths made
    absolute against the file and checked; URLs fetched). Three layouts, mixed freely:
    - {"image", "question", "answer"}: one turn;
    - LLaVA's {"image" (optional), "conversations": [{"from": "human"|"gpt", "value"}, ...]}: the `<image>` marker
      anywhere in the first human turn, moved in front of its text as the original's preprocessing does;
    - Hugging Face datasets' {"messages": [{"role", "content"}], "images" (optional)}: `{"type": "image"}` blocks,
      or string contents with the images put before the first user text (TRL's convention).

    Runs before the model loads, so that a typo in sample 9,000 fails in a second, not after an hour of training.
    """
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file")
    text = path.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not JSON or JSONL ({error})") from None
    if not rows:
        raise UsageError(f"{path}: no samples")
    samples = []
    for index, row in enumerate(rows):
        try:
            messages, images = _as_chat(row)
            samples.append({"messages": messages, "images": [_image_source(image, path) for image in images]})
        except ValueError as error:
            raise UsageError(f"{path}: sample {index}: {error}") from None
    return samples


def _as_chat(row: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """One sample of any supported layout as (messages with content blocks, images); ValueError names the problem."""
    if not isinstance(row, dict):
        raise ValueError("not an object (want image/question/answer, conversations, or messages)")
    images = row.get("images", [row["image"]] if "image" in row else [])
    if not isinstance(images, list) or not all(isinstance(i, str) and i.strip() for i in images):
        raise ValueError("images must be non-empty strings (paths relative to the data file, or URLs)")
    if "conversations" in row:
        turns = [(turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
                 for turn in row["conversations"] or []]
        turns = [({"human": "user", "gpt": "assistant"}.get(who, who), value) for who, value in turns]
    elif "messages" in row:
        turns = [(m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None) for m in row["messages"] or []]
    elif {"question", "answer"} <= set(row):
        turns = [("user", "<image>" * len(images) + str(row["question"])), ("assistant", row["answer"])]
    else:
        raise ValueError(f"has none of conversations, messages, or question and answer (keys: {sorted(row)})")
    if not turns or any(role not in ("system", "user", "assistant") for role, _ in turns):
        raise ValueError(f"roles must be human/gpt or system/user/assistant, got {[role for role, _ in turns]}")
    if turns[-1][0] != "assistant":
        raise ValueError("the last turn must be an answer (gpt / assistant): nothing to train on otherwise")
    messages = [{"role": role, "content": _blocks(content, role)} for role, content in turns]
    if "messages" in row and not any(b["type"] == "image" for m in messages for b in m["content"]) and images:
        first_user = next(m for m in messages if m["role"] == "user")  # TRL's convention for string contents
        first_user["content"][:0] = [{"type": "image"} for _ in images]
    placed = sum(b["type"] == "image" for m in messages for b in m["content"])
    if placed != len(images):
        raise ValueError(f"{placed} image markers (<image> / image blocks) but {len(images)} images")
    if any(b["type"] == "image" for m in messages if m["role"] != "user" for b in m["content"]):
        raise ValueError("images must be in user (human) turns")
    return messages, images


def _blocks(content: Any, role: str) -> list[dict[str, Any]]:
    """A turn's content as blocks; a `<image>` marker in text becomes an image block in front of the text (as the
    original's LLaVA preprocessing moves it)."""
    if isinstance(content, list):
        if not all(isinstance(b, dict) and b.get("type") in ("image", "text") for b in content):
            raise ValueError(f"a {role} turn's content blocks must be {{'type': 'image'}} or {{'type': 'text', ...}}")
        return [{"type": "image"} if b["type"] == "image" else {"type": "text", "text": str(b.get("text", ""))}
                for b in content]
    if not isinstance(content, str) or not content.replace("<image>", "").strip():
        raise ValueError(f"a {role} turn is empty or not text")
    markers = content.count("<image>")
    text = content.replace("<image>", "").strip()
    return [{"type": "image"} for _ in range(markers)] + [{"type": "text", "text": text}]


def _image_source(image: str, data_file: Path) -> Any:
    """A URL fetched now (an unreachable or non-image URL fails before the model loads, not mid-training); a path
    made absolute against the data file, whose header must be an image's (decoded when the batch needs it)."""
    from PIL import Image, UnidentifiedImageError

    if is_url(image):
        try:
            return read_image(image)
        except ValueError as error:
            raise ValueError(f"image {image}: {error}") from None
    path = data_file.parent / image if not Path(image).is_absolute() else Path(image)
    if not path.is_file():
        raise ValueError(f"no image file at {path}")
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not an image file ({error})") from None
    return str(path)


def chat_messages(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """The sample's messages with its images in their image blocks, in order."""
    images = iter(sample["images"])
    return [{"role": m["role"], "content": [{"type": "image", "image": next(images)} if b["type"] == "image" else b
                                            for b in m["content"]]} for m in sample["messages"]]


def build_example(processor: Any, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels (and pixel_values when the sample has images) of one sample: every answer
    and its end-of-turn token trained, everything else -100, as the chat template's {% generation %} blocks mark."""
    out = processor.apply_chat_template(chat_messages(sample), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, return_tensors="pt")
    input_ids = out["input_ids"][0]
    mask = torch.as_tensor(out["assistant_masks"])[0].bool()
    if not mask.any():
        raise ValueError("the chat template marks no answer tokens: it lacks {% generation %} blocks")
    example = {"input_ids": input_ids, "attention_mask": out["attention_mask"][0],
               "labels": input_ids.masked_fill(~mask, IGNORE_INDEX)}
    if "pixel_values" in out:
        example["pixel_values"] = out["pixel_values"]
    return example


class ChatDataset(torch.utils.data.Dataset):
    """Samples rendered with the processor's chat template when read: one image in memory at a time, not all of them
    (pixel values are 6.75 MiB per image at 768x768 in float32)."""

    def __init__(self, processor: Any, samples: list[dict[str, str]]):
        self.processor = processor
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return build_example(self.processor, self.samples[index])


class Collator:
    """Right-pads a batch (pad id, attention 0, label -100) and concatenates the images of those samples that have
    them, in order (the model matches them to the placeholders row by row)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pad = torch.nn.utils.rnn.pad_sequence
        collated = {
            "input_ids": pad([b["input_ids"] for b in batch], batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad([b["attention_mask"] for b in batch], batch_first=True, padding_value=0),
            "labels": pad([b["labels"] for b in batch], batch_first=True, padding_value=IGNORE_INDEX),
        }
        images = [b["pixel_values"] for b in batch if "pixel_values" in b]  # text-only samples have none
        if images:
            collated["pixel_values"] = torch.cat(images)
        return collated


def pad_token_id(processor: Any, model: Any) -> int:
    """The padding id: the tokenizer's, else the LLM config's, else end of sequence."""
    for candidate in (processor.tokenizer.pad_token_id, model.config.text_config.pad_token_id,
                      processor.tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def freeze_for_stage(model: Any, stage: int) -> None:
    """Stage 1: everything trainable. Stage 2: the Florence-2 tower frozen, DBFusion projector + LLM trainable."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if stage == 2:
        for name in TOWER_MODULES:
            getattr(model.model, name).requires_grad_(False)


def apply_lora(model: Any, stage: int, rank: int, alpha: int) -> Any:
    """Wrap the model with PEFT LoRA adapters on the LLM attention projections (the DBFusion projector fully trained)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        modules_to_save=["dbfusion_projector"] if stage == 2 else None)
    return get_peft_model(model, config)


def florence2_parameters(model: Any) -> list[torch.nn.Parameter]:
    """The Florence-2 side's parameters (TOWER_MODULES: what stage 2 freezes) of an unwrapped Florence-VL model."""
    return [p for name in TOWER_MODULES for p in getattr(model.model, name).parameters()]


def optimizer_cls_and_kwargs(model: Any, training_args: Any,
                             vision_learning_rate: float) -> tuple[type, dict[str, Any]]:
    """The Trainer's optimizer with the Florence-2 side in its own group at `vision_learning_rate`: LLaVA's
    mm_vision_tower_lr, so that a randomly initialised projector or LLM does not wreck what the tower has learnt while
    stage 1 trains it end to end."""
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    tower = {id(p) for p in florence2_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in tower]},
              {"params": [p for p in trainable if id(p) in tower], "lr": vision_learning_rate}]
    kwargs["params"] = [group for group in groups if group["params"]]
    return optimizer_cls, kwargs


def training_arguments(args: argparse.Namespace) -> Any:
    """TrainingArguments of the recipe: gradient checkpointing on, bf16 on GPUs, nothing reported anywhere."""
    from transformers import TrainingArguments

    register_model_package()
    from florence_vl.compatibility_florence_vl import CHECKPOINTING_ARGUMENT as checkpointing

    use_bf16 = args.torch_dtype == torch.bfloat16
    return TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        bf16=use_bf16,
        fp16=args.torch_dtype == torch.float16,
        **{checkpointing: args.gradient_checkpointing,
           # Non-reentrant checkpointing also back-propagates through blocks whose inputs need no grad (frozen tower,
           # LoRA).
           f"{checkpointing}_kwargs": {"use_reentrant": False}},
        logging_steps=1,
        # Checkpoints to resume from (--resume), the newest two kept; the final model is saved on its own.
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=max(args.save_steps, 1),
        save_total_limit=2,
        report_to=[],
        remove_unused_columns=False,  # pixel_values and labels are not in the model's signature as the Trainer sees it
        # Images are decoded and resized while the model trains: worker processes, not the training loop.
        dataloader_num_workers=args.workers,
        dataloader_pin_memory=args.device.startswith("cuda"),
        seed=args.seed,
        use_cpu=args.device == "cpu",
        disable_tqdm=False,
    )


def load_model_and_processor(model_path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The processor and the model through the Auto classes (remote code), weights in `dtype`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True, dtype=dtype)
    return model, processor


def save(trainer: Any, processor: Any, args: argparse.Namespace, model_path: str) -> None:
    """Save a complete folder with a card of its own, which every loader takes from anywhere (the Auto classes, the
    pipeline, ask/app, vLLM). With --lora the adapters are merged into it, and kept alone in OUTPUT_DIR/adapter too
    (PEFT's format; its base recorded as the Hub id given, or as the path from there to the base folder)."""
    from model_folder import derived_card, write_model_folder

    model = None
    if args.lora:
        adapter = args.output_dir / "adapter"
        trainer.save_model(str(adapter))
        if trainer.is_world_process_zero():
            config = json.loads((adapter / "adapter_config.json").read_text())
            local = Path(model_path).is_dir()
            config["base_model_name_or_path"] = os.path.relpath(model_path, adapter) if local else model_path
            (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            model = trainer.model.merge_and_unload()
    else:
        trainer.save_model(str(args.output_dir))  # handles FSDP / ZeRO-3 state gathering; main process writes
    if trainer.is_world_process_zero():
        what = (f"Florence-VL fine-tuned from `{model_path}` by finetune.py (stage {args.stage}"
                f"{', LoRA adapters merged (the adapters alone: adapter/)' if args.lora else ''}) on "
                f"`{args.data.name}`.")
        write_model_folder(args.output_dir, processor, derived_card(model_path, "Florence-VL, fine-tuned", what),
                           model=model)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line arguments, with paths resolved against the caller's directory and the output folder checked."""
    parser = ScriptParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="converted Florence-VL folder or Hub id (default: the embedded tiny model)")
    parser.add_argument("--data", type=Path, required=True,
                        help="JSON or JSONL: {image, question, answer}, LLaVA conversations, or messages + images")
    parser.add_argument("--output-dir", type=Path, required=True, help="must be new or empty unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --output-dir")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2, help="1: train all; 2: freeze Florence-2")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters on the LLM attention instead of the LLM")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="paper: 1e-5 (8B), 9e-5 (3B stage 2)")
    parser.add_argument("--vision-learning-rate", type=float,
                        help="learning rate of the Florence-2 side in stage 1 (default: --learning-rate)")
    parser.add_argument("--lr-scheduler", default="cosine", help="constant, linear, cosine, ...")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1, help="per device")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute activations in the backward pass: less memory, about 30%% more time")
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes (0: in the training loop)")
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    args.torch_dtype = resolve_dtype(args.dtype, args.device)
    if args.vision_learning_rate is not None and (args.stage == 2 or args.lora):
        raise UsageError("--vision-learning-rate is for stage 1 without --lora: the Florence-2 side is frozen otherwise")
    args.data = user_path(args.data)
    args.output_dir = prepare_output_dir(args.output_dir, args.overwrite or args.resume)
    return args


def train(args: argparse.Namespace, model_path: str) -> Any:
    """Load, freeze per stage, (optionally) wrap with LoRA, train and save; returns the Trainer."""
    from transformers import Trainer, set_seed

    set_seed(args.seed)
    samples = load_samples(args.data)  # before the model: bad data fails fast
    model, processor = load_model_and_processor(model_path, args.torch_dtype)
    freeze_for_stage(model, args.stage)
    if args.lora:
        model = apply_lora(model, args.stage, args.lora_rank, args.lora_alpha)
    dataset = ChatDataset(processor, samples)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"stage {args.stage}{' + LoRA' if args.lora else ''}: {trainable:,} of {total:,} parameters trainable, "
          f"{len(dataset)} samples")
    training_args = training_arguments(args)
    optimizer = None
    if args.vision_learning_rate is not None:
        optimizer = optimizer_cls_and_kwargs(model, training_args, args.vision_learning_rate)  # never with LoRA
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=Collator(pad_token_id(processor, model)), optimizer_cls_and_kwargs=optimizer)
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(f"train loss {result.training_loss:.4f} after {result.global_step} steps")
    save(trainer, processor, args, model_path)
    if trainer.is_world_process_zero():
        print(f"saved to {args.output_dir}")
    return trainer


def end_distributed() -> None:
    """Close the process group a multi-process launch (accelerate launch, torchrun) opened: left to interpreter exit,
    its communication threads were torn down mid-flight once in three runs under 4.57 ("terminate called without an
    active exception", exit -6 after the model was saved)."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> int:
    """Fine-tune the given model (default: the embedded one) and save it."""
    args = parse_args(argv)
    try:
        if args.model is not None:
            train(args, resolve_model(args.model))
            return 0
        from ask import EMBEDDED_MODEL

        print("No --model given: fine-tuning the embedded tiny model.")
        train(args, str(EMBEDDED_MODEL))
        return 0
    finally:
        end_distributed()


if __name__ == "__main__":
    quiet_libraries()
    sys.exit(run(main))
