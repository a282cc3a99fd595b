"""A browser chat demo for Florence-VL (Gradio): upload an image, ask, the answer streams in; multi-turn; clear.

    python app.py [--model PATH_OR_REPO] [--host 127.0.0.1] [--port 7860]

Without --model it serves the embedded tiny model (assets/tiny-florence-vl), fully offline; its page says what that
model answers (coloured shapes only: see README). Needs `pip install -r requirements-app.txt` (Gradio 6, which needs
huggingface_hub >= 1, i.e. transformers 5.x; with transformers 4.57 install gradio==5.50.0 instead).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import uuid
from collections import OrderedDict
from pathlib import Path
from threading import Lock, Thread
from typing import Any, Iterator, Optional

# Before gradio is imported: no usage statistics sent anywhere from a local demo.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from cli_common import (DEFAULT_MAX_NEW_TOKENS, ScriptParser, add_runtime_args, positive_int, quiet_libraries,
                        resolve_model, run)

from ask import EMBEDDED_MODEL, EMBEDDED_NOTICE, EMBEDDED_SCOPE, load_model

ROOT = Path(__file__).resolve().parent
NO_IMAGE = "Upload an image first: the model answers questions about an image."
# The page's words: its title, what the model answers, and the question box's example.
PAGE = {"title": "Florence-VL", "about": "", "example": "What is shown in the image?"}
EMBEDDED_PAGE = {"title": "Florence-VL (embedded tiny model: coloured shapes only)", "about": EMBEDDED_SCOPE,
                 "example": "What colour are the shapes?"}


class Chat:
    """The model and processor shared by every browser session, and the cache of each session's conversation (the
    `max_sessions` most recently used kept: an evicted session's next answer recomputes its chat, the same answer)."""

    def __init__(self, model_path: str, device: Optional[str], max_new_tokens: int, dtype: str = "auto",
                 max_sessions: int = 8):
        self.model, self.processor = load_model(model_path, device, dtype)
        self.max_new_tokens = max_new_tokens
        self.max_sessions = max_sessions
        self.caches: OrderedDict[str, tuple[int, Any]] = OrderedDict()  # session -> (messages it covers, cache)
        self.lock = Lock()

    def forget(self, session: str) -> None:
        """Drop the session's cache (a cleared conversation, a new image)."""
        with self.lock:
            self.caches.pop(session, None)

    def _cache_for(self, session: str, messages: list[dict[str, Any]]) -> Any:
        """The session's cache when it covers every message before the last (the new question), else None."""
        with self.lock:
            covered, cache = self.caches.pop(session, (0, None))
        return cache if covered == len(messages) - 1 else None

    def _keep(self, session: str, covered: int, cache: Any) -> None:
        with self.lock:
            self.caches[session] = (covered, cache)
            while len(self.caches) > self.max_sessions:
                self.caches.popitem(last=False)

    def stream(self, messages: list[dict[str, Any]], session: str) -> Iterator[str]:
        """The assistant's answer to the chat so far, growing piece by piece (greedy decoding), continued from the
        session's cache of the earlier turns; the cache then covers this answer too."""
        from transformers import TextIteratorStreamer

        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**inputs, streamer=streamer, max_new_tokens=self.max_new_tokens, do_sample=False,
                      past_key_values=self._cache_for(session, messages), return_dict_in_generate=True)
        result: dict[str, Any] = {}
        thread = Thread(target=lambda: result.update(output=self.model.generate(**kwargs)), daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        thread.join()
        if "output" in result:
            self._keep(session, len(messages) + 1, result["output"].past_key_values)


def user_turn(image: Optional[str], question: str, state: dict[str, Any]) -> list[dict[str, Any]]:
    """The next user turn: the image only when it is new in this conversation (the model sees it once), then text."""
    content: list[dict[str, Any]] = []
    if image and image != state.get("image"):
        content.append({"type": "image", "image": image})
        state["image"] = image
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def empty_state() -> dict[str, Any]:
    """A new conversation: no messages, no image sent yet, its own session key (for its cache)."""
    return {"messages": [], "image": None, "session": uuid.uuid4().hex}


def build_demo(chat: Chat, title: str, about: str, example: str) -> Any:
    """The Gradio Blocks UI: image, chat history, question box, send and clear buttons, the raw last answer; the title,
    what the model answers (`about`) and an `example` question in the empty question box."""
    import gradio as gr

    def respond(image: Optional[str], question: str, state: dict[str, Any], history: list[dict[str, str]]):
        """Stream the answer into the chat (and the plain-text answer box); the question box empties."""
        question = (question or "").strip()
        if not question:
            yield history, "", state, gr.update()
            return
        if not image and state.get("image") is None:  # follow-up questions may reuse the conversation's image
            gr.Warning(NO_IMAGE)
            yield history, question, state, NO_IMAGE
            return
        if image and image != state.get("image"):
            chat.forget(state["session"])  # a new image: the chat so far is recomputed with it
        state["messages"] += user_turn(image, question, state)
        history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        for answer in chat.stream(state["messages"], state["session"]):
            history[-1] = {"role": "assistant", "content": answer}
            yield history, "", state, answer
        state["messages"].append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        yield history, "", state, answer

    def clear(state: dict[str, Any]):
        """Forget the conversation and its cache (the image stays uploaded and is sent again with the next question)."""
        chat.forget(state["session"])
        return [], "", empty_state(), ""

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\n{about}\n\nUpload an image, ask a question; follow-up questions continue the "
                    "conversation.", elem_id="about")
        state = gr.State(empty_state())
        with gr.Row():
            with gr.Column(scale=1):
                # PNG, RGB: the model gets exactly the uploaded pixels (no lossy re-encoding).
                image = gr.Image(type="filepath", format="png", image_mode="RGB", label="Image", elem_id="image")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420)
                question = gr.Textbox(label="Question", placeholder=example, elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear_button = gr.Button("Clear conversation", elem_id="clear")
                answer = gr.Textbox(label="Last answer (plain text)", interactive=False, elem_id="answer")
        outputs = [chatbot, question, state, answer]
        send.click(respond, [image, question, state, chatbot], outputs)
        question.submit(respond, [image, question, state, chatbot], outputs)
        clear_button.click(clear, [state], outputs)
    return demo


def offline_theme() -> Any:
    """Gradio's default look with system fonts: the default theme fetches web fonts, which an offline demo cannot."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = ScriptParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="converted Florence-VL folder or Hub id (default: the embedded tiny model)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to serve on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--max-cached-sessions", type=positive_int, default=8,
                        help="conversations whose cache is kept (the most recent; the others recompute)")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a service manager, `kill`) unwinds like Ctrl-C, so the scratch folder below is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="florence_vl_app_") as scratch:
        os.environ["GRADIO_TEMP_DIR"] = str(Path(scratch) / "uploads")  # uploads go with it
        if args.model is None:
            print(EMBEDDED_NOTICE)
            model_path, page = str(EMBEDDED_MODEL), EMBEDDED_PAGE
        else:
            model_path, page = resolve_model(args.model), PAGE
        chat = Chat(model_path, args.device, args.max_new_tokens, args.dtype, args.max_cached_sessions)
        demo = build_demo(chat, **page)
        try:
            demo.queue().launch(server_name=args.host, server_port=args.port, theme=offline_theme(), share=False)
        finally:
            demo.close()  # stop the server threads before the scratch folder goes
    return 0


if __name__ == "__main__":
    quiet_libraries()
    sys.exit(run(main))
