"""A browser chat demo for Florence-VL (Gradio): upload an image, ask, the answer streams in; multi-turn; clear.

    python app.py [--model PATH_OR_REPO] [--host 127.0.0.1] [--port 7860]

Without --model it serves the embedded tiny model (assets/tiny-random-florence-vl, RANDOM weights: gibberish answers),
fully offline. Needs `pip install -r requirements-app.txt` (Gradio 6, which needs huggingface_hub >= 1, i.e.
transformers 5.x; with transformers 4.57 install gradio==5.50.0 instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from threading import Thread
from typing import Any, Iterator, Optional

# Before gradio is imported: no usage statistics sent anywhere from a local demo.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parent


class Chat:
    """The model, its processor and the generation settings, shared by every browser session."""

    def __init__(self, model_path: str, device: Optional[str], max_new_tokens: int):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def stream(self, messages: list[dict[str, Any]]) -> Iterator[str]:
        """The assistant's answer to the chat so far, growing piece by piece (greedy decoding)."""
        from transformers import TextIteratorStreamer

        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.device)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**inputs, streamer=streamer, max_new_tokens=self.max_new_tokens, do_sample=False)
        thread = Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        thread.join()


def user_turn(image: Optional[str], question: str, state: dict[str, Any]) -> list[dict[str, Any]]:
    """The next user turn: the image only when it is new in this conversation (the model sees it once), then text."""
    content: list[dict[str, Any]] = []
    if image and image != state.get("image"):
        content.append({"type": "image", "image": image})
        state["image"] = image
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def empty_state() -> dict[str, Any]:
    """A new conversation: no messages, no image sent yet."""
    return {"messages": [], "image": None}


def build_demo(chat: Chat, title: str) -> Any:
    """The Gradio Blocks UI: image, chat history, question box, send and clear buttons, the raw last answer."""
    import gradio as gr

    def respond(image: Optional[str], question: str, state: dict[str, Any], history: list[dict[str, str]]):
        """Stream the answer into the chat (and the plain-text answer box); the question box empties."""
        question = (question or "").strip()
        if not question:
            yield history, "", state, gr.update()
            return
        state["messages"] += user_turn(image, question, state)
        history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        for answer in chat.stream(state["messages"]):
            history[-1] = {"role": "assistant", "content": answer}
            yield history, "", state, answer
        state["messages"].append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        yield history, "", state, answer

    def clear():
        """Forget the conversation (the image stays uploaded and is sent again with the next question)."""
        return [], "", empty_state(), ""

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nUpload an image, ask a question; follow-up questions continue the conversation.")
        state = gr.State(empty_state())
        with gr.Row():
            with gr.Column(scale=1):
                # PNG, RGB: the model gets exactly the uploaded pixels (no lossy re-encoding).
                image = gr.Image(type="filepath", format="png", image_mode="RGB", label="Image", elem_id="image")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420)
                question = gr.Textbox(label="Question", placeholder="What is shown in the image?", elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear_button = gr.Button("Clear conversation", elem_id="clear")
                answer = gr.Textbox(label="Last answer (plain text)", interactive=False, elem_id="answer")
        outputs = [chatbot, question, state, answer]
        send.click(respond, [image, question, state, chatbot], outputs)
        question.submit(respond, [image, question, state, chatbot], outputs)
        clear_button.click(clear, None, outputs)
    return demo


def offline_theme() -> Any:
    """Gradio's default look with system fonts: the default theme fetches web fonts, which an offline demo cannot."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="converted Florence-VL folder or Hub id (default: embedded tiny model)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to serve on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="florence_vl_tiny_") as scratch:
        model_path, title = args.model, "Florence-VL"
        if model_path is None:
            from ask import materialise_embedded_model

            print("No --model given: serving the embedded tiny model with RANDOM weights (answers are gibberish).")
            model_path = str(materialise_embedded_model(Path(scratch) / "tiny-random-florence-vl"))
            title = "Florence-VL (embedded tiny model, random weights)"
        demo = build_demo(Chat(model_path, args.device, args.max_new_tokens), title)
        demo.queue().launch(server_name=args.host, server_port=args.port, theme=offline_theme(), share=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
