"""Build tests/assets/phi3_tiny_tokenizer offline: a 400-id byte-level BPE with Phi-3 special tokens.

Phi-3/3.5-mini's tokenizer adds no BOS (add_bos_token false) and its chat tokens (and <|placeholder1|>, the image token)
are special added tokens;
this miniature keeps those two properties (the real one is a SentencePiece BPE of 32064 ids).
Run: python tests/assets/build_phi3_tiny_tokenizer.py
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>", "<|placeholder1|>"]
CORPUS = [
    "You are a helpful AI assistant.",
    "What is shown in the image? Describe it in detail. What is the text in the image?",
    "The image shows a red square, a blue circle and some text on a white background.",
    "A chat between a curious user and an artificial intelligence assistant gives helpful, detailed, and polite",
    "answers to the user's questions about pictures, charts, documents, photographs, diagrams and scenes.",
    "Locate the objects in the image, with their descriptions. Count them, then explain the layout.",
]


def main() -> None:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 50, trainer=trainer)
    if tokenizer.get_vocab_size() != 400:  # the tiny test configs have a 400-row embedding table
        raise RuntimeError(f"expected 400 ids, got {tokenizer.get_vocab_size()}: add corpus text")
    out = Path(__file__).resolve().parent / "phi3_tiny_tokenizer"
    out.mkdir(exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        '{\n  "tokenizer_class": "PreTrainedTokenizerFast",\n  "bos_token": "<s>",\n  "eos_token": "<|end|>",\n'
        '  "unk_token": "<unk>",\n  "pad_token": "<|endoftext|>",\n  "add_bos_token": false,\n'
        '  "clean_up_tokenization_spaces": false,\n  "model_max_length": 4096\n}\n'
    )


if __name__ == "__main__":
    main()
