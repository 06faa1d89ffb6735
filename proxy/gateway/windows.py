"""Context windows: how many tokens a model takes in, and a chat request cut to fit.

A model's `context_window` in TURBO_CONFIG is its window. Where none is declared (zero config, or a
model without one), Turbo learns one per deployment: from the upstream's model listing (vLLM's
`max_model_len`, llama.cpp's `meta.n_ctx_train` or `n_ctx`), asked once when first needed, or from a
`context_length_exceeded` answer that names it. Both are remembered in this process.

Tokens are counted offline (proxy.usage.tokens, as the budgets count them); an upstream's own tokenizer
may count more, so the ratio it reported (`usage.prompt_tokens` against our count) is learned per
deployment too, and the count scaled by it.
"""

import json
import logging
import re
import time
from typing import Any

from django.conf import settings

from proxy.config import Deployment
from proxy.errors import GatewayError
from proxy.gateway import client, health
from proxy.gateway.routing import gateway_config
from proxy.usage.tokens import count_messages, count_text

logger = logging.getLogger("turbo.gateway")

LISTING_RETRY_SECONDS = 300.0  # a listing that said nothing (or failed) is asked again after this
LISTING_TIMEOUT_SECONDS = 10.0
LISTING_MAX_BYTES = 1024 * 1024
RATIO_MIN_TOKENS = 50  # shorter prompts are mostly framing: their ratio says little
RATIO_MAX = 3.0

_learned: dict[tuple[str, str], int] = {}  # (deployment id, upstream model name) -> window
_listed: dict[str, float] = {}  # deployment id -> time.monotonic() its listing was last asked
_ratios: dict[str, float] = {}  # deployment id -> its tokens per offline-counted token

_LIMIT_WORDS = (
    re.compile(r"maximum context length is (\d+)", re.IGNORECASE),
    re.compile(r"context window of (\d+)", re.IGNORECASE),
    re.compile(r"context (?:size|length|window)[^0-9]{0,20}\((\d+)\)", re.IGNORECASE),
)
_CONTEXT_WORDS = re.compile(r"context (?:length|size|window)|maximum context", re.IGNORECASE)
# How many tokens the upstream counted in the prompt it refused: OpenAI's, vLLM's and llama-cpp-python's words.
_PROMPT_WORDS = re.compile(r"\((\d+) in the messages", re.IGNORECASE)


def forget() -> None:
    """Start from nothing (tests, and a configuration that changed)."""
    _learned.clear()
    _listed.clear()
    _ratios.clear()


health.forget_also(forget)  # what was learned of the deployments' context windows goes with them


def _upstream_model(deployment: Deployment, model: str) -> str:
    return deployment.model or model


def learned(deployment: Deployment, model: str) -> int | None:
    """The window learned for a deployment serving `model` (the public name), if any."""
    return _learned.get((deployment.id, _upstream_model(deployment, model)))


def context_error(error: Any) -> tuple[bool, int | None]:
    """Does an upstream's `error` object say the request was longer than the model's window, and which window?"""
    if not isinstance(error, dict):
        return False, None
    message = str(error.get("message") or "")
    is_context = (
        error.get("code") == "context_length_exceeded"
        or error.get("type") == "exceed_context_size_error"
        or bool(_CONTEXT_WORDS.search(message))
    )
    if not is_context:
        return False, None
    window = error.get("n_ctx")
    if isinstance(window, int) and window > 0:
        return True, window
    for pattern in _LIMIT_WORDS:
        found = pattern.search(message)
        if found:
            return True, int(found.group(1))
    return True, None


def learn_from_error(deployment: Deployment, model: str, error: Any, payload: dict | None = None) -> bool:
    """Remember the window an upstream's context error names, and (with the refused request's `payload`)
    how many tokens it counted in that prompt against the offline count. Is it a context error?"""
    is_context, window = context_error(error)
    if window:
        key = (deployment.id, _upstream_model(deployment, model))
        if _learned.get(key) != window:
            logger.info("deployment %s: its context window is %d tokens (from its error)", deployment.id, window)
        _learned[key] = window
    if is_context and payload is not None:
        learn_ratio(deployment.id, payload, _prompt_tokens_said(error))
    return is_context


def _prompt_tokens_said(error: dict) -> int | None:
    """The prompt's tokens as a context error counts them (llama.cpp's `n_prompt_tokens`, or its words)."""
    said = error.get("n_prompt_tokens")
    if isinstance(said, int):
        return said
    found = _PROMPT_WORDS.search(str(error.get("message") or ""))
    return int(found.group(1)) if found else None


def learn_ratio(deployment_id: str, payload: dict | None, prompt_tokens: Any) -> None:
    """An answer's `usage.prompt_tokens` against the offline count of its request."""
    if not isinstance(prompt_tokens, int) or not isinstance(payload, dict):
        return
    counted = count_messages(payload.get("messages"), str(payload.get("model") or ""))
    if counted < RATIO_MIN_TOKENS:
        return
    ratio = min(max(prompt_tokens / counted, 1.0), RATIO_MAX)
    earlier = _ratios.get(deployment_id)
    _ratios[deployment_id] = ratio if earlier is None else (earlier + ratio) / 2


def _listing_window(data: Any, model: str) -> int | None:
    """The window a model listing gives `model` (or its one model, on a one-model server)."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    entries = [entry for entry in entries if isinstance(entry, dict)]
    named = [entry for entry in entries if entry.get("id") == model]
    chosen = named[0] if named else entries[0] if len(entries) == 1 else None
    if chosen is None:
        return None
    meta = chosen.get("meta") if isinstance(chosen.get("meta"), dict) else {}
    for value in (chosen.get("max_model_len"), meta.get("n_ctx"), meta.get("n_ctx_train")):
        if isinstance(value, int) and value > 0:
            return value
    return None


async def _ask_listing(deployment: Deployment, model: str) -> None:
    """Read the deployment's upstream's model listing once (again after LISTING_RETRY_SECONDS)."""
    now = time.monotonic()
    if now - _listed.get(deployment.id, -LISTING_RETRY_SECONDS) < LISTING_RETRY_SECONDS:
        return
    _listed[deployment.id] = now
    upstream = deployment.upstream
    if upstream.problem or not upstream.base_url:
        return
    try:
        status, body = await client.models_get(
            upstream,
            timeout=LISTING_TIMEOUT_SECONDS,
            max_bytes=LISTING_MAX_BYTES,
            connect_timeout=min(upstream.connect_timeout, LISTING_TIMEOUT_SECONDS),
        )
        data = json.loads(body) if status == 200 else None
    except (client.TransportError, TimeoutError, ValueError) as exc:
        logger.info("deployment %s: its model listing could not be read: %s", deployment.id, exc)
        return
    window = _listing_window(data, _upstream_model(deployment, model))
    if window:
        logger.info("deployment %s: its context window is %d tokens (from its model listing)", deployment.id, window)
        _learned[(deployment.id, _upstream_model(deployment, model))] = window


async def window_of(model: str) -> tuple[int | None, float]:
    """The context window of the public model `model` (None: unknown), and the ratio to scale offline
    token counts by: its declared `context_window`, else the smallest its deployments are known by."""
    try:
        declared = gateway_config().model(model)
    except GatewayError:
        return None, 1.0
    if declared is None or not declared.deployments:
        return None, 1.0
    ratio = max((_ratios.get(d.id, 1.0) for d in declared.deployments), default=1.0)
    if declared.context_window:
        return declared.context_window, ratio
    known = []
    for deployment in declared.deployments:
        key = (deployment.id, _upstream_model(deployment, model))
        if key not in _learned:
            await _ask_listing(deployment, model)
        if key in _learned:
            known.append(_learned[key])
    return (min(known) if known else None), ratio


def _system_end(messages: list) -> int:
    start = 0
    while start < len(messages) and isinstance(messages[start], dict):
        if messages[start].get("role") not in ("system", "developer"):
            break
        start += 1
    return start


def turn_start(messages: list) -> int:
    """Where the current turn begins: the last user message (what follows it, tool rounds and retries, is its)."""
    start = _system_end(messages)
    for index in range(len(messages) - 1, start - 1, -1):
        if isinstance(messages[index], dict) and messages[index].get("role") == "user":
            return index
    return start


def _exchanges(messages: list, current: int) -> tuple[list, list[list], list]:
    """(the leading system messages, the earlier exchanges, the current turn: from `current` on)."""
    start = min(_system_end(messages), current)
    groups: list[list] = []
    for message in messages[start:current]:
        if not groups or (isinstance(message, dict) and message.get("role") == "user"):
            groups.append([])
        groups[-1].append(message)
    return messages[:start], groups, messages[current:]


async def context_fit(request: dict, *, current: int | None = None) -> dict:
    """`request` (a chat completion's body) cut to its model's context window: the oldest earlier
    exchanges go first, the system prompt and the current turn (from message `current` on; default:
    the last user message) stay, and `max_tokens` is clamped to what is left. Unchanged when the
    window is unknown. Raises GatewayError 400
    `context_length_exceeded`, before any upstream call, when less than CONTEXT_REPLY_MIN_TOKENS
    would be left for the reply."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return request
    model = str(request.get("model") or settings.DEFAULT_MODEL)
    window, ratio = await window_of(model)
    if window is None:
        return request
    head, groups, turn = _exchanges(messages, turn_start(messages) if current is None else current)

    def tokens(part: list) -> int:
        return int(count_messages(part, model) * ratio + 0.5)

    tools = request.get("tools")
    fixed = tokens(head + turn) + (int(count_text(json.dumps(tools), model) * ratio) if tools else 0)
    size_key = "max_completion_tokens" if "max_completion_tokens" in request else "max_tokens"
    asked = request.get(size_key) if isinstance(request.get(size_key), int) else None
    room = min(asked or settings.CONTEXT_REPLY_TOKENS, window // 2)
    kept: list[list] = []
    used = fixed
    for group in reversed(groups):
        cost = tokens(group) - tokens([])  # the reply's priming is counted once, in `fixed`
        if used + cost + room > window:
            break
        used += cost
        kept.append(group)
    left = window - used
    if left < settings.CONTEXT_REPLY_MIN_TOKENS:
        raise GatewayError(
            f"the prompt is about {fixed} tokens: with room for a reply it does not fit the model's context "
            f"window of {window} tokens; send a shorter prompt",
            status=400,
            code="context_length_exceeded",
            error_type="invalid_request_error",
        )
    fitted = {**request, "messages": [*head, *(m for group in reversed(kept) for m in group), *turn]}
    if asked is not None or left < settings.CONTEXT_REPLY_TOKENS:
        fitted[size_key] = min(asked or left, left)
    return fitted
