"""finetune.py on the tiny model (CPU): label masking, stage 1 / stage 2 training, saved checkpoints and LoRA adapters
that reload with identical logits, and the same script under `accelerate launch` with two processes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, require_fixture

import finetune

FIXTURE = require_fixture()
SAMPLES = [
    {"image": "shapes_640x480.png", "question": "What is shown in the image?", "answer": "Colored shapes on white."},
    {"image": "gradient_gray_256.png", "question": "Describe the image.", "answer": "A gray gradient."},
    {"image": "noise_300x500.png", "question": "What is this?", "answer": "Random noise."},
]
TRAIN_FLAGS = ["--max-steps", "3", "--batch-size", "3", "--learning-rate", "1e-3", "--lr-scheduler", "constant",
               "--device", "cpu", "--save-steps", "0", "--workers", "0"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """A JSONL file of the samples; images are given relative to the file, as users write them."""
    folder = tmp_path_factory.mktemp("finetune_data")
    for sample in SAMPLES:
        (folder / sample["image"]).write_bytes((FIXTURE / sample["image"]).read_bytes())
    path = folder / "samples.jsonl"
    path.write_text("".join(json.dumps(sample) + "\n" for sample in SAMPLES))
    return path


def test_json_list_and_jsonl_give_the_same_samples(data_file, tmp_path):
    listed = data_file.parent / "samples.json"
    listed.write_text(json.dumps(SAMPLES))
    assert finetune.load_samples(listed) == finetune.load_samples(data_file)
    assert [s["images"] for s in finetune.load_samples(listed)] == [[str(data_file.parent / s["image"])] for s in SAMPLES]


def batch_of(processor, data_file: Path) -> dict[str, torch.Tensor]:
    """All samples as one padded training batch."""
    dataset = finetune.ChatDataset(processor, finetune.load_samples(data_file))
    return finetune.Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def eval_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """The loss on `batch` in eval mode (no dropout), so that before and after are comparable."""
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def load(folder: Path):
    """Model and processor through the Auto classes with remote code, as users load them."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True).eval()
    return model, processor


def run_training(folder: Path, data_file: Path, output_dir: Path, *flags: str):
    """finetune.train in this process (the CLI's code path) and the Trainer it returns."""
    args = finetune.parse_args(["--model", str(folder), "--data", str(data_file), "--output-dir", str(output_dir),
                                *TRAIN_FLAGS, *flags])
    return finetune.train(args, str(folder))


@pytest.mark.parametrize("llm,end_of_turn", [("llama", "<|eot_id|>"), ("phi3", "<|end|>")])
def test_labels_are_the_answer_and_end_of_turn_only(tiny_repo_factory, data_file, llm, end_of_turn):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_repo_factory(llm)), trust_remote_code=True)
    example = finetune.build_example(processor, finetune.load_samples(data_file)[0])
    ids, labels = example["input_ids"], example["labels"]
    trained = labels != finetune.IGNORE_INDEX
    # One contiguous span, at the same positions as the ids, decoding to exactly answer + end of turn, at the end.
    positions = trained.nonzero().flatten().tolist()
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert torch.equal(labels[trained], ids[trained])
    assert processor.tokenizer.decode(labels[trained]) == SAMPLES[0]["answer"] + end_of_turn
    assert (ids[: positions[0]] == processor.image_token_id).sum().item() == processor.image_seq_length
    assert example["pixel_values"].shape[0] == 1


LLAVA = [
    {"id": "multi-turn", "image": "shapes_640x480.png", "conversations": [
        {"from": "human", "value": "Describe the image.\n<image>"},  # the marker anywhere: moved in front
        {"from": "gpt", "value": "Coloured shapes."},
        {"from": "human", "value": "How many?"},
        {"from": "gpt", "value": "Several."}]},
    {"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
]
MESSAGES = [  # the same two samples in Hugging Face datasets' layout (string contents, images before the first text)
    {"images": ["shapes_640x480.png"], "messages": [
        {"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "Coloured shapes."},
        {"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Several."}]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
]


def write_json(folder: Path, name: str, rows: list[dict]) -> Path:
    (folder / "shapes_640x480.png").write_bytes((FIXTURE / "shapes_640x480.png").read_bytes())
    path = folder / name
    path.write_text(json.dumps(rows))
    return path


def test_llava_conversations_train_every_answer_and_mix_text_only_samples(tiny_repo_factory, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_repo_factory("llama")), trust_remote_code=True)
    samples = finetune.load_samples(write_json(tmp_path, "llava.json", LLAVA))
    assert samples[0]["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
    assert samples[1]["images"] == []
    examples = [finetune.build_example(processor, sample) for sample in samples]
    decode = processor.tokenizer.decode
    for example, answers in zip(examples, (["Coloured shapes.", "Several."], ["Hi."])):
        trained = example["labels"] != finetune.IGNORE_INDEX
        assert decode(example["labels"][trained]) == "".join(a + "<|eot_id|>" for a in answers)
        # The questions (and everything else) are not trained.
        assert "How many?" not in decode(example["labels"][trained]) and "Say hi." not in decode(example["labels"][trained])
    assert "pixel_values" not in examples[1]
    batch = finetune.Collator(processor.tokenizer.pad_token_id)(examples)
    assert batch["pixel_values"].shape[0] == 1  # the text-only sample brings no image, and none leaks into it
    # The Hugging Face messages layout of the same samples gives the same training examples.
    same = [finetune.build_example(processor, sample)
            for sample in finetune.load_samples(write_json(tmp_path, "messages.json", MESSAGES))]
    for a, b in zip(examples, same):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_llava_data_trains_end_to_end(tiny_repo_factory, tmp_path):
    folder = tiny_repo_factory("llama")
    data = write_json(tmp_path, "llava.json", LLAVA)
    trainer = run_training(folder, data, tmp_path / "out", "--stage", "2", "--batch-size", "2", "--max-steps", "3")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_stage1_trains_everything_and_lowers_the_loss(tiny_repo_factory, data_file, tmp_path):
    folder = tiny_repo_factory("llama")
    before_model, processor = load(folder)
    batch = batch_of(processor, data_file)
    before = eval_loss(before_model, batch)
    # One step: back-propagating through the DaViT tower at 768x768 is the slow part on CPUs (most under 5.x).
    trainer = run_training(folder, data_file, tmp_path / "stage1", "--stage", "1", "--max-steps", "1")
    model = trainer.model
    assert all(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
    assert eval_loss(model, batch) < before
    tower_before = before_model.model.vision_tower.state_dict()
    assert any(not torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in tower_before.items())


def test_vision_learning_rate_sets_the_florence2_side_apart(tiny_repo_factory, data_file, tmp_path):
    folder = tiny_repo_factory("llama")
    before_model, _ = load(folder)
    # Learning rate 0 for the Florence-2 side: it gets gradients (stage 1) but must not move; the rest must.
    trainer = run_training(folder, data_file, tmp_path / "stage1", "--stage", "1", "--max-steps", "1",
                           "--vision-learning-rate", "0")
    assert sorted(group["lr"] for group in trainer.optimizer.param_groups) == [0.0, 1e-3]
    old, new = before_model.state_dict(), trainer.model.state_dict()
    tower = [k for k in old if any(f"model.{m}." in k for m in finetune.TOWER_MODULES)]
    assert tower and all(torch.equal(old[k], new[k]) for k in tower)
    assert not torch.equal(old["lm_head.weight"], new["lm_head.weight"])


@pytest.mark.parametrize("flags", [["--stage", "2"], ["--stage", "1", "--lora"]])
def test_vision_learning_rate_is_refused_where_the_tower_is_frozen(tiny_repo_factory, data_file, tmp_path, flags):
    with pytest.raises(finetune.UsageError, match="--vision-learning-rate"):
        run_training(tiny_repo_factory("llama"), data_file, tmp_path / "out", *flags, "--vision-learning-rate", "1e-5")


def test_stage2_freezes_the_tower_and_checkpoint_reloads(tiny_repo_factory, data_file, tmp_path):
    folder = tiny_repo_factory("llama")
    before_model, processor = load(folder)
    batch = batch_of(processor, data_file)
    before = eval_loss(before_model, batch)
    trainer = run_training(folder, data_file, tmp_path / "stage2", "--stage", "2")
    model = trainer.model
    assert eval_loss(model, batch) < before

    old, new = before_model.state_dict(), model.state_dict()
    tower = [k for k in old if any(f"model.{m}." in k for m in finetune.TOWER_MODULES)]
    trained = [k for k in old if "dbfusion_projector" in k or "language_model" in k or k.startswith("lm_head")]
    assert tower and trained
    assert all(torch.equal(old[k], new[k]) for k in tower), "stage 2 changed Florence-2 tower weights"
    assert all(not torch.equal(old[k], new[k]) for k in trained if k.endswith("weight") and "norm" not in k)

    # A complete folder of its own: code, card with Hub metadata naming what it was trained from, example image.
    from florence_vl.configuration_florence_vl import REMOTE_CODE_FILES

    saved = tmp_path / "stage2"
    assert all((saved / name).is_file() and not (saved / name).is_symlink() for name in REMOTE_CODE_FILES)
    card = (saved / "README.md").read_text()
    assert card.startswith("---\n") and "custom_code" in card and f"fine-tuned from `{folder}`" in card
    assert (saved / "assets" / "example.png").is_file()
    reloaded, reloaded_processor = load(saved)
    auto_map = json.loads((tmp_path / "stage2" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_florence_vl.FlorenceVLForConditionalGeneration"
    assert eval_loss(reloaded, batch) == eval_loss(model, batch)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
    sample = finetune.load_samples(data_file)[0]
    assert reloaded_processor.apply_chat_template(finetune.chat_messages(sample)) == \
        processor.apply_chat_template(finetune.chat_messages(sample))


def test_lora_reaches_phi3s_fused_qkv_proj(tiny_repo_factory, data_file, tmp_path):
    """Phi-3 fuses q/k/v into one `qkv_proj`: the LoRA targets cover it (and its o_proj), as the docs say."""
    from safetensors import safe_open

    run_training(tiny_repo_factory("phi3"), data_file, tmp_path / "lora_phi3", "--stage", "2", "--lora",
                 "--lora-rank", "4", "--max-steps", "1")
    with safe_open(str(tmp_path / "lora_phi3" / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        trained = list(saved.keys())
    assert any("self_attn.qkv_proj.lora_A" in n for n in trained), trained[:8]
    assert any("self_attn.o_proj.lora_A" in n for n in trained)


def test_lora_output_is_a_merged_complete_folder_and_the_adapter_alone(tiny_repo_factory, data_file, tmp_path):
    """--lora trains only the adapters (and the DBFusion projector); OUTPUT_DIR is a complete folder with them merged,
    which the Auto classes and ask.py load (copied elsewhere too), and OUTPUT_DIR/adapter is the adapter alone, its base
    recorded as the path from there, so that the two folders copied together still find each other."""
    import shutil

    from peft import PeftModel

    folder = tiny_repo_factory("llama")
    base, processor = load(folder)
    batch = batch_of(processor, data_file)
    before = eval_loss(base, batch)
    out = tmp_path / "lora"
    trainer = run_training(folder, data_file, out, "--stage", "2", "--lora", "--lora-rank", "4")
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as saved:  # what was trained
        names = list(saved.keys())
    assert any("self_attn.q_proj.lora_A" in n for n in names)
    assert all("lora_" in n or "dbfusion_projector" in n for n in names), names[:8]

    fresh_base, _ = load(folder)
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert not Path(config["base_model_name_or_path"]).is_absolute()
    assert (adapter / config["base_model_name_or_path"]).resolve() == Path(folder).resolve()
    with_adapter = PeftModel.from_pretrained(fresh_base, str(adapter)).eval()
    assert any("self_attn.q_proj.lora_A" in n for n, _ in with_adapter.named_parameters())
    merged, _ = load(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        expected = with_adapter(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert eval_loss(merged, batch) < before
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.glob("*.safetensors"))

    copied = tmp_path / "elsewhere" / "lora-copy"
    shutil.copytree(out, copied)
    result = subprocess.run([sys.executable, str(ROOT / "ask.py"), "--model", str(copied), "--question", "Colour?"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=""))
    assert result.returncode == 0 and result.stdout.startswith("Q: Colour?\nA: "), result.stderr[-2000:]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_two_processes(tiny_repo_factory, data_file, tmp_path):
    folder = tiny_repo_factory("llama")
    accelerate = Path(sys.executable).parent / "accelerate"
    # accelerate's torchrun launcher (--multi_gpu) + --device cpu (Trainer's use_cpu): DDP over gloo, two CPU processes.
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(ROOT / "finetune.py"), "--model", str(folder), "--data", str(data_file),
               "--output-dir", str(tmp_path / "ddp"), "--stage", "2", "--max-steps", "2", "--batch-size", "1",
               "--learning-rate", "1e-3", "--lr-scheduler", "constant", "--device", "cpu", "--save-steps", "0",
               "--workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("train loss") == 2, output[-4000:]  # both ranks trained
    # 3 samples, 1 per rank and step: with two ranks one step is half an epoch (alone it would be a third).
    assert "'epoch': 0.5" in output or "'epoch': '0.5'" in output, output[-4000:]
    # What the two ranks trained together was saved: stage 2 moved the LLM and kept the Florence-2 side.
    base, _ = load(folder)
    trained, _ = load(tmp_path / "ddp")
    old, new = base.state_dict(), trained.state_dict()
    tower = [k for k in old if any(f"model.{m}." in k for m in finetune.TOWER_MODULES)]
    assert tower and all(torch.equal(old[k], new[k]) for k in tower)
    assert not torch.equal(old["lm_head.weight"], new["lm_head.weight"])
