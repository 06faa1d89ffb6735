"""The prompt-to-reply loop: store the prompt, stream the model's answer (running the tools it asks
for between rounds), save the reply, and tell the chat's members at every step.

Every prompt, streamed to the caller or not, runs as a background task that streams from the model,
so members always see the reply grow and a client that hangs up does not stop it. The final save is
retried while the database is away (FINAL_SAVE_RETRY_SECONDS) and the final event is always sent
(retried the same way while the stream's transport is away). At shutdown, running generations get
SHUTDOWN_GRACE_SECONDS to finish; the rest are saved as interrupted.

Structured output: with a json_schema `response_format` (the prompt's, else the chat's default), the
reply still streams; once it ends it is validated (proxy.structured). A reply that fails is asked for
again with the errors (STRUCTURED_RETRIES times at most): members get a `message.delta` with `retry`
({"attempt", "errors"}) whose `message.reply` no longer holds the failed attempt, and the new attempt
streams after it. The parsed value is saved as `Message.data`; the last failure is
`invalid_structured_output`. Client functions: a model's call to one of the client's own functions
ends the turn (status `tool_calls`, the calls in `tool_calls` with `client: true`); the client's
`tool_results` resume the same message.
"""

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DatabaseError, InterfaceError, transaction
from django.utils import timezone

from accounts.models import User
from chats import running
from chats.context import chat_context_extend, chat_context_forget_now, chat_context_get, context_fit
from chats.models import Chat, Message
from chats.options import settings_apply
from chats.serializers import message_data
from chats.services import chat_model_check
from chats.stream import (
    MESSAGE_COMPLETED,
    MESSAGE_CREATED,
    MESSAGE_DELTA,
    MESSAGE_FAILED,
    ReplyEvents,
    aevent_send,
    message_event,
)
from proxy import ai, completion, functions, structured, tools
from proxy.gateway import GatewayError
from proxy.gateway.windows import turn_start
from proxy.usage.budgets import BudgetExceeded, budget_reserve
from proxy.usage.caller import Caller
from turbo_site.core import tracing
from turbo_site.core.crypto import secret_decrypt
from turbo_site.core.errors import Forbidden, Invalid, RateLimited, ServiceUnavailable, outcome_of
from turbo_site.core.streams import StreamUnavailable
from turbo_site.core.text import storable, storable_json

if TYPE_CHECKING:
    from chats.programs.runner import ProgramTurn

logger = logging.getLogger("turbo.chats")

INTERRUPTED = "interrupted: the server stopped during generation"
STOPPED = "stopped"
DELETED = "the message was deleted while its reply was being generated"
STORAGE_UNAVAILABLE = (
    "the reply could not be stored (the database is unavailable); it is kept and stored when it is back"
)


@dataclass
class PromptPlan:
    """Everything the model call needs, read before it starts (no database during generation)."""

    message: Message
    request: dict
    api_key: str | None
    allowed_tools: list[str]
    allowed_models: frozenset[str] | None = None  # the user's and the chat's group's limit; None: any
    program: "ProgramTurn | None" = None  # a turn of the chat's program (chats.programs.runner)
    caller: Caller | None = None  # who the model calls are for: the user, and the chat's group
    client_functions: frozenset[str] = frozenset()  # the client's own functions: a call to one ends the turn


@dataclass
class Outcome:
    """How a generation ended."""

    message: Message
    error: GatewayError | None = None


@dataclass
class _Reply:
    """The reply as it grows, and its deltas on the chat's stream."""

    message: Message
    base: dict
    text: str = ""
    usage: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    unsent: str = ""  # text whose delta event could not be sent: it goes out with the next one
    data: object = None  # the structured reply, parsed and valid (proxy.structured)
    pending: bool = False  # the model called a client function: the turn waits for its results
    code: str = ""  # a failed reply's outcome code (turbo_site.core.errors), carried by `message.failed`
    events: ReplyEvents | None = None  # its deltas on the way, not waited for one by one

    def snapshot(self) -> dict:
        return {**self.base, "reply": self.text, "tool_calls": self.records}

    async def add(self, text: str) -> None:
        self.text += text
        self.unsent += text
        if self.events is None:
            self.events = ReplyEvents(self.message.chat_id)
        # Not stored yet when this returns: the next delta is read meanwhile. Text not stored comes back in
        # `unsent`, for the next delta (subscribers were told to reconnect; the final event has it all).
        self.unsent = await self.events.send(
            MESSAGE_DELTA, self.unsent, **message_event(MESSAGE_DELTA, self.snapshot(), self.unsent)
        )

    async def restart(self, at: int, attempt: int, errors: list[str]) -> None:
        """A structured reply failed its schema: its text (from `at`) goes; members see `message.reply`
        without it, in a delta that carries `retry`, and the next attempt streams after it."""
        self.text, self.unsent = self.text[:at], ""
        if self.events is not None:
            self.events.forget()
        try:
            await aevent_send(
                self.message.chat_id,
                MESSAGE_DELTA,
                **message_event(MESSAGE_DELTA, self.snapshot(), ""),
                retry={"attempt": attempt, "errors": errors},
            )
        except StreamUnavailable:
            pass


class QuietReply:
    """Where a reply nobody sees goes (a chat program's sub-program or `Generate(forward=False)`); its
    usage still counts towards the turn's message."""

    def __init__(self, usage: dict | None = None):
        self.text = ""
        self.usage = {} if usage is None else usage
        self.records: list[dict] = []
        self.data = None
        self.pending = False

    async def add(self, text: str) -> None:
        self.text += text

    async def restart(self, at: int, attempt: int, errors: list[str]) -> None:
        self.text = self.text[:at]


def _model_request(
    *, chat: Chat, user: User, messages: list[dict], response_format: dict | None, client_functions: list[dict]
) -> dict:
    """The model request of an ordinary chat's prompt: its messages, the chat's settings and tools, the
    client's functions and the response_format in force."""
    request = settings_apply(
        {
            "model": chat.model,
            "messages": messages,
            "user": ai.user_tag(user),
            "stream_options": {"include_usage": True},
        },
        chat.settings,
    )
    if chat.tools or client_functions:
        request["tools"] = [*tools.openai_tools(chat.tools), *client_functions]
    if response_format:
        request["response_format"] = response_format
    return request


@transaction.atomic
def _message_start(
    *,
    chat: Chat,
    user: User,
    prompt: str,
    context_size: int,
    otr: bool,
    allowed_models: frozenset[str] | None,
    response_format: dict | None = None,
    client_functions: list[dict] | None = None,
) -> PromptPlan:
    # Refused before anything is stored; an off-the-record note never reaches the model, so it is not.
    if not otr:
        allowed_models = chat_model_check(model=chat.model, allowed_models=allowed_models, group=chat.group)
    message = Message.objects.create(
        chat=chat,
        author=user,
        prompt=storable(prompt),  # the model still gets it as sent
        model=chat.model,
        is_otr=otr,
        status=Message.Status.COMPLETE if otr else Message.Status.STREAMING,
    )
    Chat.objects.filter(pk=chat.pk).update(updated_at=timezone.now())
    if otr:
        return PromptPlan(message, {}, None, [])
    context = context_fit(
        chat_context_get(chat_id=chat.pk, size=context_size), prompt=prompt, system=chat.system_prompt
    )
    request = _model_request(
        chat=chat,
        user=user,
        messages=ai.build_messages(prompt, context, chat.system_prompt or None),
        response_format=response_format,
        client_functions=client_functions or [],
    )
    return PromptPlan(
        message,
        request,
        secret_decrypt(chat.api_key_encrypted),
        list(chat.tools),
        allowed_models,
        caller=Caller(user.pk, chat.group_id),
        client_functions=functions.function_names(client_functions or []),
    )


@transaction.atomic
def _message_resume(
    *,
    chat: Chat,
    user: User,
    tool_results: list[dict],
    context_size: int,
    allowed_models: frozenset[str] | None,
    response_format: dict | None,
    client_functions: list[dict],
) -> PromptPlan:
    """Give a message waiting on client function calls (status `tool_calls`) their results and plan the
    rest of its reply. Refused (400, nothing changed) unless the results answer exactly the calls one
    message waits for; only the prompt's author or the chat's owner may answer (403)."""
    allowed_models = chat_model_check(model=chat.model, allowed_models=allowed_models, group=chat.group)
    answers = {result["tool_call_id"]: result for result in tool_results}
    waiting = Message.objects.select_for_update().filter(chat=chat, status=Message.Status.TOOL_CALLS)
    message = next(
        (
            m
            for m in waiting
            if any(r.get("client") and r.get("result") is None and r.get("id") in answers for r in m.tool_calls)
        ),
        None,
    )
    if message is None:
        first = next(iter(answers))
        raise Invalid(
            f"tool_results[0].tool_call_id: no call {first!r} waits for a result in this chat", code="unknown_tool_call"
        )
    pending = [r["id"] for r in message.tool_calls if r.get("client") and r.get("result") is None]
    for index, call_id in enumerate(answers):
        if call_id not in pending:
            raise Invalid(
                f"tool_results[{index}].tool_call_id: {call_id!r} is not a call this message waits on",
                code="unknown_tool_call",
            )
    missing = [call_id for call_id in pending if call_id not in answers]
    if missing:
        raise Invalid(f"tool_results: the results of {', '.join(missing)} are missing", code="tool_results_missing")
    if user.pk not in (message.author_id, chat.owner_id):
        raise Forbidden("only the prompt's author or the chat's owner may send its tool results")
    records = [
        {**r, "result": answers[r["id"]]["content"], "is_error": answers[r["id"]]["is_error"]}
        if r.get("id") in answers and r.get("client")
        else r
        for r in message.tool_calls
    ]
    message.tool_calls = records
    message.status = Message.Status.STREAMING
    message.save(update_fields=["tool_calls", "status", "updated_at"])
    Chat.objects.filter(pk=chat.pk).update(updated_at=timezone.now())
    context = context_fit(
        chat_context_get(chat_id=chat.pk, size=context_size), prompt=message.prompt, system=chat.system_prompt
    )
    messages = ai.build_messages(message.prompt, context, chat.system_prompt or None)
    # Earlier rounds are replayed as one assistant turn with every call made so far, then their results.
    calls = [
        {"id": r["id"], "type": "function", "function": {"name": r["name"], "arguments": r["arguments"]}}
        for r in records
    ]
    messages.append({"role": "assistant", "content": message.reply or None, "tool_calls": calls})
    messages += [{"role": "tool", "tool_call_id": r["id"], "content": r["result"] or ""} for r in records]
    request = _model_request(
        chat=chat, user=user, messages=messages, response_format=response_format, client_functions=client_functions
    )
    return PromptPlan(
        message,
        request,
        secret_decrypt(chat.api_key_encrypted),
        list(chat.tools),
        allowed_models,
        caller=Caller(user.pk, chat.group_id),
        client_functions=functions.function_names(client_functions),
    )


@transaction.atomic
def _program_turn_start(
    *, chat: Chat, user: User, prompt: str | None, allowed_models: frozenset[str] | None
) -> PromptPlan:
    """A turn of the chat's program: claimed (or refused) before anything is stored. The opening turn
    (no prompt) is the program's own message, with no author."""
    from chats.programs.runner import ProgramTurn, turn_claim

    allowed_models = chat_model_check(model=chat.model, allowed_models=allowed_models, group=chat.group)
    state = turn_claim(chat=chat, prompt=prompt)
    message = Message.objects.create(
        chat=chat,
        author=user if prompt is not None else None,
        prompt=storable(prompt or ""),
        model=chat.model,
        status=Message.Status.STREAMING,
    )
    Chat.objects.filter(pk=chat.pk).update(updated_at=timezone.now())
    request = {"model": chat.model, "user": ai.user_tag(user)}
    turn = ProgramTurn(state=state, prompt=prompt, chat_settings=dict(chat.settings))
    return PromptPlan(
        message,
        request,
        secret_decrypt(chat.api_key_encrypted),
        list(chat.tools),
        allowed_models,
        program=turn,
        caller=Caller(user.pk, chat.group_id),
    )


class MessageGone(Exception):
    """The message is no longer `streaming` in the database: deleted during its generation, or already
    ended by the sweeper (chats.sweeper). Nothing to save, and nobody to tell."""


@transaction.atomic
def _message_finish(*, message: Message, reply: _Reply, status: str, error: str, program=None, turn=None) -> None:
    """Store the reply, only while the message is still `streaming` (MessageGone otherwise): a deleted
    message never comes back, whatever the reply loop still holds."""
    fields = {
        "reply": storable(reply.text),
        "tool_calls": storable_json(reply.records),
        "data": storable_json(reply.data),
        "status": status,
        "error": storable(error),
        "prompt_tokens": reply.usage.get("prompt_tokens"),
        "completion_tokens": reply.usage.get("completion_tokens"),
        "total_tokens": reply.usage.get("total_tokens"),
        "updated_at": timezone.now(),
    }
    if not Message.objects.filter(pk=message.pk, status=Message.Status.STREAMING).update(**fields):
        raise MessageGone(message.pk)
    for name, value in fields.items():
        setattr(message, name, value)
    if program is not None:
        from chats.programs.runner import turn_save

        turn_save(chat_id=message.chat_id, result=turn if status == Message.Status.COMPLETE else None)


def _context_after(message: Message, reply: _Reply) -> None:
    """The cached context learns the new exchange; if the cache is away, it is dropped (rebuilt later)."""
    if message.status != Message.Status.COMPLETE or message.is_otr or not message.prompt:
        return
    try:
        chat_context_extend(message.chat_id, message.prompt, reply.text)
    except Exception as exc:
        logger.warning("message %s: the cached context could not be extended: %s", message.pk, exc)
        try:
            chat_context_forget_now(message.chat_id)
        except Exception:
            pass  # a cache that is away lost the key or will expire it (CONTEXT_CACHE_SECONDS)


# --- running generations ----------------------------------------------------------------------------

# Generations running in this process, so that they are not garbage-collected and shutdown finds them.
_generations: set[asyncio.Task] = set()
_draining = False


def generations_running() -> int:
    return len(_generations)


async def message_prompt(
    *,
    chat: Chat,
    user: User,
    prompt: str | None,
    context_size: int,
    stream: bool,
    otr: bool,
    allowed_models: frozenset[str] | None = None,
    response_format: dict | None = None,
    client_functions: list[dict] | None = None,
    tool_results: list[dict] | None = None,
) -> Message:
    """Store a prompt, have the model answer it, and send the reply to the chat's members.

    With `stream`, this returns at once with the stored message (status "streaming") while the reply
    is generated in the background. Without it, this waits for the reply and raises GatewayError if the
    upstream failed. Either way the prompt is stored first and never lost; a failure marks the message
    "error", keeping any partial reply. A chat whose model the user (`allowed_models`, their session's
    limit; None: any) or the chat's group may not use is refused first (403 `model_not_allowed`),
    storing nothing.

    In a chat that runs a program (chats.programs), the prompt is the program's next input and the
    reply is what the program shows until it asks for input again; `prompt=None` is its opening turn.

    `response_format` (OpenAI's shape; None: the chat's default) asks for a structured reply, validated
    and parsed into `Message.data` (proxy.structured); a bad one is a 400 `invalid_response_format`.
    `client_functions` are the client's own function definitions (proxy.functions): a call to one ends
    the turn with status `tool_calls`; `tool_results` (with no prompt) answer those calls and resume that
    message. Bad input is a 400 naming the problem, storing nothing.
    """
    if _draining:
        raise ServiceUnavailable("this server is shutting down; send the prompt again", retry_after=2)
    response_format = structured.response_format_check(response_format)
    client_functions = functions.client_functions_check(client_functions, reserved=tools.tool_names())
    if tool_results is not None:
        tool_results = functions.tool_results_check(tool_results)
        if prompt:
            raise Invalid("send either a prompt or tool_results, not both")
    if (response_format or client_functions or tool_results) and (otr or chat.program):
        where = "an off-the-record note" if otr else "a chat that runs a program"
        raise Invalid(f"{where} takes no response_format, tools or tool_results")
    if response_format is None and not chat.program:
        response_format = chat.response_format or None
    if not otr:
        await _budget_left(Caller(user.pk, chat.group_id))
    if tool_results:
        plan = await database_sync_to_async(_message_resume)(
            chat=chat,
            user=user,
            tool_results=tool_results,
            context_size=context_size,
            allowed_models=allowed_models,
            response_format=response_format,
            client_functions=client_functions,
        )
    elif chat.program and not otr:
        plan = await database_sync_to_async(_program_turn_start)(
            chat=chat, user=user, prompt=prompt, allowed_models=allowed_models
        )
    else:
        plan = await database_sync_to_async(_message_start)(
            chat=chat,
            user=user,
            prompt=prompt,
            context_size=context_size,
            otr=otr,
            allowed_models=allowed_models,
            response_format=response_format,
            client_functions=client_functions,
        )
    message = plan.message
    if otr:
        await _send_final(message, MESSAGE_CREATED)
        return message
    base = message_data(message)
    trace = tracing.span_start(  # the prompt's span, ended with its generation
        "chat prompt",
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": chat.model,
            "turbo.chat.id": str(chat.pk),
            "turbo.message.id": str(message.pk),
        },
        content={"gen_ai.input.messages": prompt},
    )
    opening = MESSAGE_DELTA if tool_results else MESSAGE_CREATED  # a resumed message was created before
    with tracing.span("chat fan-out", {"turbo.chat.event": opening}, parent=trace):
        try:
            await aevent_send(message.chat_id, opening, **message_event(opening, base))
        except StreamUnavailable:
            logger.warning("chat %s: %s not sent, the stream is unavailable", message.chat_id, opening)
    # A fresh context: the task outlives this request, whose thread executor ends with it.
    task = asyncio.get_running_loop().create_task(_generate(plan, base), context=tracing.task_context(trace))
    tracing.task_span_end(trace, task)
    _generations.add(task)
    task.add_done_callback(_generations.discard)
    running.running_add(message.pk, task)
    await running.alive_mark(message.pk)
    if stream:
        return message
    outcome: Outcome = await asyncio.shield(task)
    if outcome.error is not None:
        raise outcome.error
    return outcome.message


async def _budget_left(caller: Caller) -> None:
    """Refuse a prompt (429 `budget_exceeded`, storing nothing) when a budget of the user or of the
    chat's group is used up. Each model call still reserves what it may cost (proxy.gateway)."""
    try:
        reservation = await budget_reserve(caller, Decimal(0))
    except BudgetExceeded as refused:
        raise RateLimited(refused.message, retry_after=refused.retry_after, code="budget_exceeded") from None
    if reservation is not None:
        await reservation.settle(Decimal(0))


def program_open(*, chat: Chat, user: User, allowed_models: frozenset[str] | None) -> None:
    """Run a new program chat's opening turn, until the program first asks for input (for sync callers).

    A failure is the opening message's (status "error", `message.failed`); the chat stays usable.
    """
    from asgiref.sync import async_to_sync

    try:
        async_to_sync(message_prompt)(
            chat=chat, user=user, prompt=None, context_size=0, stream=False, otr=False, allowed_models=allowed_models
        )
    except GatewayError as exc:
        logger.warning("chat %s: the program's opening turn failed: %s", chat.pk, exc.message)


async def _generate(plan: PromptPlan, base: dict) -> Outcome:
    """Stream the answer to the chat's members, running requested tools between rounds; save it."""
    # A resumed message (client tool results) goes on from what it has.
    earlier = plan.message
    usage = {
        name: getattr(earlier, name)
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
        if getattr(earlier, name) is not None
    }
    reply = _Reply(earlier, base, text=earlier.reply, usage=usage, records=list(earlier.tool_calls))
    status, error, failure, turn = Message.Status.COMPLETE, "", None, None
    try:
        if plan.program is not None:
            turn = await plan.program.run(plan, reply)
        else:
            await reply_stream(plan, plan.request, reply)
            if reply.pending:
                status = Message.Status.TOOL_CALLS
    except GatewayError as exc:
        status, error, failure = Message.Status.ERROR, exc.message, exc
    except asyncio.CancelledError:
        if plan.message.pk in running.deleted:  # nothing to save and nobody to tell: the message is gone
            asyncio.current_task().uncancel()
            return Outcome(plan.message, GatewayError(DELETED, status=409, code="message_deleted"))
        if plan.message.pk in running.stop_requested:  # a member pressed stop: an ending, not a shutdown
            asyncio.current_task().uncancel()
            status, error = Message.Status.ERROR, STOPPED
            failure = GatewayError("the reply was stopped", status=409, code="stopped")
        else:
            status, error = Message.Status.ERROR, INTERRUPTED
            failure = GatewayError(INTERRUPTED, status=503)
            reply.code = outcome_of(failure).code
            # Saved whether or not anyone is listening, even though the task is being cancelled.
            await asyncio.shield(_finish(plan, reply, status, error, turn))
            raise
    except Exception:
        logger.exception("generation of message %s failed", plan.message.pk)
        status, error = Message.Status.ERROR, "internal error during generation"
        failure = GatewayError(error, status=502)
    if failure is not None:
        reply.code = outcome_of(failure).code
    stored = await asyncio.shield(_finish(plan, reply, status, error, turn))
    if stored is None:
        return Outcome(plan.message, GatewayError(DELETED, status=409, code="message_deleted"))
    if not stored:
        return Outcome(plan.message, GatewayError(STORAGE_UNAVAILABLE, status=503, code="storage_unavailable"))
    return Outcome(plan.message, failure)


async def reply_stream(plan: PromptPlan, request: dict, reply: "_Reply | QuietReply") -> str:
    """Ask the model through the completion service (proxy.completion), streaming its text into
    `reply`: the tools it calls run between rounds, their records shown; a json_schema reply that fails
    is dropped from `reply` (members see the `retry`) and asked for again; the parsed value lands in
    `reply.data`. A call to one of the client's functions (`plan.client_functions`) ends the turn:
    `reply.pending`, with the calls recorded (`client: true`). Returns the text it added.

    Each round is cut to the model's context window (oldest exchanges first; 400
    context_length_exceeded if even this turn leaves no room for a reply): chats, programs and
    conversations alike. The turn, from its prompt on (with its tool rounds and retries), always stays."""
    start = len(reply.text)
    ending, ran = False, []  # a round with client calls: its records go in at its end, in the calls' order
    async with aclosing(
        completion.complete(
            request,
            caller=plan.caller,
            api_key=plan.api_key,
            allowed_models=plan.allowed_models,
            server_tools=plan.allowed_tools,
            client_functions=getattr(plan, "client_functions", frozenset()),
            fit_from=turn_start(request.get("messages") or []),
        )
    ) as items:
        async for item in items:
            if isinstance(item, completion.Delta):
                if item.text:
                    await reply.add(item.text)
            elif isinstance(item, completion.Usage):
                _add_usage(reply.usage, item.usage)
            elif isinstance(item, completion.ToolCall):
                ending, ran = bool(item.client), []
            elif isinstance(item, completion.ToolResult):
                ran = item.records
                if not ending:
                    reply.records += item.records
                    await reply.add("")  # members see the calls and their results
            elif isinstance(item, completion.Retry):
                await reply.restart(len(reply.text) - len(item.text), item.attempt, item.errors)
            elif isinstance(item, completion.Done):
                if item.client_calls:  # the client runs these: the turn ends here, the server's calls done
                    by_id = {record["id"]: record for record in ran}
                    calls = item.completion.tool_calls
                    reply.records += [by_id.get(call.get("id", "")) or _client_record(call) for call in calls]
                    reply.pending = True
                    await reply.add("")
                reply.data = item.parsed
    return reply.text[start:]


def _client_record(call: dict) -> dict:
    """A call of a client's function, waiting for the client's result."""
    function = call.get("function") or {}
    return {
        "id": call.get("id", ""),
        "name": function.get("name", ""),
        "arguments": function.get("arguments", ""),
        "result": None,
        "is_error": False,
        "client": True,
    }


def _add_usage(total: dict, usage: dict | None) -> None:
    for name, value in (usage or {}).items():
        if isinstance(value, int):
            total[name] = (total.get(name) or 0) + value


# --- stopping a reply ---------------------------------------------------------------------------------


def _streaming_messages_to_stop(*, chat: Chat, user: User) -> list[uuid.UUID]:
    from turbo_site.core.errors import Forbidden

    streaming = list(Message.objects.filter(chat=chat, status=Message.Status.STREAMING).values_list("pk", "author_id"))
    mine = [pk for pk, author_id in streaming if user.pk in (author_id, chat.owner_id)]
    if streaming and not mine:
        raise Forbidden("only the prompt's author or the chat's owner may stop this reply")
    return mine


async def generations_stop_chat(*, chat: Chat, user: User) -> int:
    """Stop the chat's replies being generated, in whatever process runs them (the prompt's author or
    the chat's owner only). Each ends `status: "error"`, `error: "stopped"`, keeping its partial reply.
    Returns how many were asked to stop."""
    message_ids = await database_sync_to_async(_streaming_messages_to_stop)(chat=chat, user=user)
    if not message_ids:
        return 0
    try:
        await running.stops_announce(message_ids)
    except StreamUnavailable:
        raise ServiceUnavailable("stop requests cannot reach the other server processes; try again") from None
    return len(message_ids)


# --- the end of a reply -------------------------------------------------------------------------------


async def _retrying(what: str, message_id: uuid.UUID, attempt, errors: tuple) -> bool:
    """Call `attempt` until it succeeds or FINAL_SAVE_RETRY_SECONDS have passed; did it succeed?"""
    deadline = time.monotonic() + settings.FINAL_SAVE_RETRY_SECONDS
    pause = 0.1
    while True:
        try:
            await attempt()
            return True
        except errors as exc:
            if time.monotonic() + pause > deadline:
                logger.error("message %s: could not %s, giving up: %s", message_id, what, exc)
                return False
            logger.warning("message %s: could not %s, retrying: %s", message_id, what, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)


async def _finish(plan: PromptPlan, reply: _Reply, status: str, error: str, turn=None) -> bool | None:
    """Save the reply (retried while the database is away), then send the final event. A program's turn
    is recorded in the same transaction. Returns True once stored; None if the message is gone (deleted:
    no event); False if it could not be stored in time: members get `message.failed` (code
    `storage_unavailable`) with the reply as it stands, and the save goes on in the background until
    the database is back (then `message.completed` or `message.failed` tells the stored outcome)."""
    message = plan.message

    async def save():
        await database_sync_to_async(_message_finish)(
            message=message, reply=reply, status=status, error=error, program=plan.program, turn=turn
        )

    try:
        stored = await _retrying("save the reply", message.pk, save, (DatabaseError, InterfaceError))
    except MessageGone:
        return None
    except Exception:
        logger.exception("message %s: the reply could not be saved", message.pk)
        stored = False
    if not stored:
        await _send_final(message, MESSAGE_FAILED, unstored=reply)
        task = asyncio.get_running_loop().create_task(_save_late(plan, reply, save, status, turn))
        _generations.add(task)
        task.add_done_callback(_generations.discard)
        return False
    await _after_save(plan, reply, status, turn)
    return True


async def _after_save(plan: PromptPlan, reply: _Reply, status: str, turn) -> None:
    """What follows a stored reply: the cached context learns it, a program's turn goes on, members are told."""
    message = plan.message
    try:
        await sync_to_async(_context_after, thread_sensitive=False)(message, reply)
        if plan.program is not None and status == Message.Status.COMPLETE:
            from chats.programs.runner import turn_after_save

            await turn_after_save(turn)
    except Exception:
        logger.exception("message %s: after its save", message.pk)
    ended = status in (Message.Status.COMPLETE, Message.Status.TOOL_CALLS)  # tool_calls: the turn ended well
    await _send_final(message, MESSAGE_COMPLETED if ended else MESSAGE_FAILED, code="" if ended else reply.code)


async def _save_late(plan: PromptPlan, reply: _Reply, save, status: str, turn) -> None:
    """Keep trying to store a reply whose save outlived FINAL_SAVE_RETRY_SECONDS, for as long as
    FINAL_SAVE_LATE_SECONDS; its alive mark is kept meanwhile, so the sweeper leaves it alone."""
    message = plan.message
    deadline = time.monotonic() + settings.FINAL_SAVE_LATE_SECONDS
    pause = 1.0
    while time.monotonic() < deadline:
        await running.alive_mark(message.pk)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 15.0)
        try:
            await save()
        except MessageGone:
            return
        except (DatabaseError, InterfaceError) as exc:
            logger.warning("message %s: the reply is still not stored: %s", message.pk, exc)
            continue
        except Exception:
            logger.exception("message %s: the reply could not be stored", message.pk)
            return
        logger.info("message %s: the reply is stored now that the database is back", message.pk)
        await _after_save(plan, reply, status, turn)
        return
    logger.error("message %s: the reply could not be stored in %ss; the sweeper will end it", message.pk, deadline)


@tracing.traced("chat fan-out", lambda message, type, **_: {"turbo.chat.event": type})
async def _send_final(message: Message, type: str, *, unstored: _Reply | None = None, code: str = "") -> None:
    """The message's final event; `code` says why a failed one failed (the same outcome code every front
    gives); with `unstored`, the reply that could not be stored (status error, code
    `storage_unavailable`), so that members still see it."""
    data = message_data(message)
    extra = {"code": code} if code else {}
    if unstored is not None:
        data = {**data, "status": Message.Status.ERROR, "error": STORAGE_UNAVAILABLE}
        data.update(reply=unstored.text, tool_calls=unstored.records)
        extra = {"code": "storage_unavailable"}

    async def send():
        await aevent_send(message.chat_id, type, **message_event(type, data, partial=False), **extra)

    try:
        await _retrying(f"send {type}", message.pk, send, (StreamUnavailable,))
    except Exception:
        logger.exception("message %s: %s could not be sent", message.pk, type)


async def generations_stop(*, grace_seconds: float) -> None:
    """Graceful shutdown: refuse new prompts, let running generations finish for a while, then stop
    and save the rest as interrupted."""
    global _draining
    _draining = True
    if _generations:
        logger.info("waiting up to %ss for %d generations", grace_seconds, len(_generations))
        _, pending = await asyncio.wait(list(_generations), timeout=grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=settings.FINAL_SAVE_RETRY_SECONDS + 5)
