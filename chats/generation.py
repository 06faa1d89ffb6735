"""The prompt-to-reply service: store the prompt, stream the model's answer (running the tools it
asks for between rounds), save the reply, and tell the chat's members at every step.

Every prompt, streamed to the caller or not, runs as a background task that streams from the model,
so members always see the reply grow and a client that hangs up does not stop it. Its jobs live
beside it: the prompt's plan (chats.prompts), the loop over the model call (chats.reply), the final
save and event (chats.reply_end), the running replies and what stops them (chats.running).

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
from dataclasses import dataclass
from decimal import Decimal

from channels.db import database_sync_to_async

from accounts.models import User
from chats import running
from chats.models import Chat, Message
from chats.prompts import message_resume, message_start, program_turn_start
from chats.reply import PromptPlan, Reply, reply_stream
from chats.reply_end import STORAGE_UNAVAILABLE, final_event_send, reply_finish
from chats.serializers import message_data
from chats.stream import MESSAGE_CREATED, MESSAGE_DELTA, aevent_send, message_event
from proxy import functions, structured, tools
from proxy.gateway import GatewayError
from proxy.usage.budgets import BudgetExceeded, budget_reserve
from proxy.usage.caller import Caller
from turbo_site.core import tracing
from turbo_site.core.errors import Invalid, RateLimited, ServiceUnavailable, outcome_of
from turbo_site.core.streams import StreamUnavailable

logger = logging.getLogger("turbo.chats")

INTERRUPTED = "interrupted: the server stopped during generation"
STOPPED = "stopped"
DELETED = "the message was deleted while its reply was being generated"


@dataclass
class Outcome:
    """How a generation ended."""

    message: Message
    error: GatewayError | None = None


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
    if running.is_draining():
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
        plan = await database_sync_to_async(message_resume)(
            chat=chat,
            user=user,
            tool_results=tool_results,
            context_size=context_size,
            allowed_models=allowed_models,
            response_format=response_format,
            client_functions=client_functions,
        )
    elif chat.program and not otr:
        plan = await database_sync_to_async(program_turn_start)(
            chat=chat, user=user, prompt=prompt, allowed_models=allowed_models
        )
    else:
        plan = await database_sync_to_async(message_start)(
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
        await final_event_send(message, MESSAGE_CREATED)
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
    reply = Reply(earlier, base, text=earlier.reply, usage=usage, records=list(earlier.tool_calls))
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
            await asyncio.shield(reply_finish(plan, reply, status, error, turn))
            raise
    except Exception:
        logger.exception("generation of message %s failed", plan.message.pk)
        status, error = Message.Status.ERROR, "internal error during generation"
        failure = GatewayError(error, status=502)
    if failure is not None:
        reply.code = outcome_of(failure).code
    stored = await asyncio.shield(reply_finish(plan, reply, status, error, turn))
    if stored is None:
        return Outcome(plan.message, GatewayError(DELETED, status=409, code="message_deleted"))
    if not stored:
        return Outcome(plan.message, GatewayError(STORAGE_UNAVAILABLE, status=503, code="storage_unavailable"))
    return Outcome(plan.message, failure)
