"""Chat with any model reference in the terminal, streaming tokens as they are generated.

align chat --model smollm2-135m --prompt "What is the capital of France?" --temperature 0
align chat --model adapter:sft          # interactive: /reset clears the conversation, /exit quits
"""

import sys
from threading import Thread
from typing import Any, TextIO

from align.errors import AlignError
from align.models import has_chat_template, load_model


def run_chat(
    model_ref: str,
    *,
    registry: Any = None,
    prompt: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    input_fn: Any = input,
    output: TextIO = sys.stdout,
) -> str | None:
    """Answer `prompt` and return the reply; without a prompt, chat interactively and return None."""
    if max_new_tokens < 1:
        raise AlignError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise AlignError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise AlignError(f"top_p must be in (0, 1], got {top_p}")
    model, tokenizer = load_model(model_ref, registry)
    if not has_chat_template(tokenizer):
        raise AlignError(f"model {model_ref!r} has no chat template: chat needs an instruct (chat) model")
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "use_cache": True}
    if temperature > 0:
        gen_kwargs |= {"do_sample": True, "temperature": temperature, "top_p": top_p}
    else:
        gen_kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    start = [{"role": "system", "content": system}] if system else []

    if prompt is not None:
        return _reply(model, tokenizer, [*start, {"role": "user", "content": prompt}], gen_kwargs, output)

    output.write(f"Chatting with {model_ref}. /reset clears the conversation, /exit (or Ctrl-D) quits.\n")
    history = list(start)
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            return None
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return None
        if text == "/reset":
            history = list(start)
            output.write("(conversation cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        output.write("assistant> ")
        history.append({"role": "assistant", "content": _reply(model, tokenizer, history, gen_kwargs, output)})


def _reply(model: Any, tokenizer: Any, messages: list[dict], gen_kwargs: dict, output: TextIO) -> str:
    """Generate in a background thread and write the text to `output` as it arrives."""
    from transformers import TextIteratorStreamer

    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            model.generate(**inputs, **gen_kwargs, streamer=streamer, pad_token_id=tokenizer.pad_token_id)
        except BaseException as e:  # re-raised below; end the stream so the loop does not wait forever
            failure.append(e)
            streamer.end()

    thread = Thread(target=generate, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        output.write(piece)
        output.flush()
        pieces.append(piece)
    thread.join()
    output.write("\n")
    if failure:
        raise failure[0]
    return "".join(pieces).strip()
