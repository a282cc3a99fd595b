"""Fine-tune Florence-VL on image-question-answer samples with the paper's two-stage recipe (transformers Trainer).

    python finetune.py --model MODEL --data samples.jsonl --output-dir out --stage 2 [--lora]
    accelerate launch [--config_file fsdp.yaml] finetune.py ...      # several GPUs or processes, same code

--stage 1 trains the whole model; --stage 2 freezes the Florence-2 tower (DaViT tower, its projection and the BART
encoder that computes the breadth features) and trains the DBFusion projector and the LLM. --lora trains LoRA adapters
on the LLM's attention projections instead of the LLM (and, in stage 2, the whole DBFusion projector). Labels come from
the model's own chat template: only the answer tokens and the end-of-turn token after them are trained.

The data file is JSON (a list) or JSONL of {"image": path (relative to the file) or URL, "question": ..., "answer": ...}.
Without --model it fine-tunes the embedded tiny model (assets/tiny-florence-vl, trained on coloured shapes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from cli_common import (UsageError, add_runtime_args, prepare_output_dir, quiet_libraries, resolve_device, resolve_dtype,
                        resolve_model, run, user_path)

ROOT = Path(__file__).resolve().parent
IGNORE_INDEX = -100
# The Florence-2 side of the model: frozen in stage 2 (the paper's instruction-tuning stage).
TOWER_MODULES = ("vision_tower", "vision_projector", "breadth_encoder")
# LLM attention projections for LoRA: Llama's q/k/v/o, Phi-3's fused qkv and o.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|qkv_proj)$"


def load_samples(path: Path) -> list[dict[str, str]]:
    """The samples of a JSON list or JSONL file, image paths made absolute (relative to the file) and checked.

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
        if not isinstance(row, dict):
            raise UsageError(f"{path}: sample {index} is not an object with image, question and answer")
        missing = {"image", "question", "answer"} - set(row)
        if missing:
            raise UsageError(f"{path}: sample {index} lacks {sorted(missing)}")
        if not all(isinstance(row[key], str) and row[key].strip() for key in ("image", "question", "answer")):
            raise UsageError(f"{path}: sample {index}: image, question and answer must be non-empty strings")
        image = row["image"]
        if not image.startswith(("http://", "https://")):
            image = str(path.parent / image) if not Path(image).is_absolute() else image
            if not Path(image).is_file():
                raise UsageError(f"{path}: sample {index}: no image file at {image}")
        samples.append({"image": image, "question": row["question"], "answer": row["answer"]})
    return samples


def chat_messages(sample: dict[str, str], with_answer: bool) -> list[dict[str, Any]]:
    """The sample as chat messages: the user turn (image + question) and, optionally, the assistant's answer."""
    messages = [{"role": "user", "content": [{"type": "image", "image": sample["image"]},
                                              {"type": "text", "text": sample["question"]}]}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": sample["answer"]}]})
    return messages


def build_example(processor: Any, sample: dict[str, str]) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, pixel_values and labels of one sample; labels are -100 except answer + end of turn."""
    full = processor.apply_chat_template(chat_messages(sample, True), tokenize=True, return_dict=True,
                                         return_tensors="pt")
    # The prompt's ids without preprocessing the image a second time: the processor expands each marker into
    # image_seq_length placeholder tokens before tokenising, and so does this.
    prompt = processor.apply_chat_template(chat_messages(sample, False), add_generation_prompt=True)
    marker = processor.image_token
    prompt_ids = torch.tensor(processor.tokenizer(prompt.replace(marker, marker * processor.image_seq_length))["input_ids"])
    input_ids = full["input_ids"][0]
    start = len(prompt_ids)
    # The rendered answer must extend the rendered prompt token for token, or the mask would be off.
    if len(input_ids) <= start or not torch.equal(input_ids[:start], prompt_ids):
        raise ValueError("the chat template's prompt is not a token prefix of prompt + answer; cannot mask labels")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    end = len(input_ids)
    # Train the answer and the first special token after it (the end of turn: <|eot_id|>, <|end|>), not what follows.
    special = set(processor.tokenizer.all_special_ids)
    for position in range(start, len(input_ids)):
        if input_ids[position].item() in special:
            end = position + 1
            break
    labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids, "attention_mask": full["attention_mask"][0], "pixel_values": full["pixel_values"],
            "labels": labels}


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
    """Right-pads a batch (pad id, attention 0, label -100) and concatenates the images."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pad = torch.nn.utils.rnn.pad_sequence
        return {
            "input_ids": pad([b["input_ids"] for b in batch], batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad([b["attention_mask"] for b in batch], batch_first=True, padding_value=0),
            "labels": pad([b["labels"] for b in batch], batch_first=True, padding_value=IGNORE_INDEX),
            "pixel_values": torch.cat([b["pixel_values"] for b in batch]),
        }


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

    use_bf16 = args.torch_dtype == torch.bfloat16
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing; the old name warns on every run.
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")
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
    """Save the model (or the LoRA adapter) as a complete folder with a card of its own, so that the Auto classes /
    PeftModel reload it from anywhere."""
    from model_folder import derived_card, write_model_folder

    trainer.save_model(str(args.output_dir))  # handles FSDP / ZeRO-3 state gathering; main process writes
    if trainer.is_world_process_zero():
        what = (f"Florence-VL fine-tuned from `{model_path}` by finetune.py (stage {args.stage}"
                f"{', LoRA adapters' if args.lora else ''}) on `{args.data.name}`.")
        write_model_folder(args.output_dir, processor, derived_card(model_path, "Florence-VL, fine-tuned", what))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line arguments, with paths resolved against the caller's directory and the output folder checked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="converted Florence-VL folder or Hub id (default: the embedded tiny model)")
    parser.add_argument("--data", type=Path, required=True, help="JSON or JSONL of {image, question, answer}")
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


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.model is not None:
        train(args, resolve_model(args.model))
        return 0
    from ask import EMBEDDED_MODEL

    print("No --model given: fine-tuning the embedded tiny model.")
    train(args, str(EMBEDDED_MODEL))
    return 0


if __name__ == "__main__":
    quiet_libraries()
    sys.exit(run(main))
