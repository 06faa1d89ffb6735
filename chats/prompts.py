"""A prompt's plan: the prompt (or a message's client tool results) stored, and everything its model
call needs read from the database before the call starts (a PromptPlan, chats.reply), so that no
database connection is held while the model answers.

Three ways in: an ordinary chat's prompt (its context, settings, tools, client functions and
response_format), the client's results for the functions a message waits on (the same message
resumes), and a turn of the chat's program (claimed here, run by chats.programs.runner). Each refuses
a model the user or the chat's group may not use before anything is stored.
"""

from django.db import transaction
from django.utils import timezone

from accounts.models import User
from chats.context import chat_context_get, context_fit
from chats.models import Chat, Message
from chats.options import settings_apply
from chats.programs.runner import ProgramTurn, turn_claim
from chats.reply import PromptPlan
from chats.services import chat_model_check
from proxy import ai, functions, tools
from proxy.usage.caller import Caller
from turbo_site.core.crypto import secret_decrypt
from turbo_site.core.errors import Forbidden, Invalid
from turbo_site.core.text import storable


def _chat_plan(
    chat: Chat,
    user: User,
    message: Message,
    messages: list[dict],
    allowed_models: frozenset[str] | None,
    response_format: dict | None,
    client_functions: list[dict],
) -> PromptPlan:
    """The plan of an ordinary chat's message: the model request of `messages` with the chat's settings
    and tools, the client's functions and the response_format in force; the chat's key; the models allowed;
    who the calls are for (the user and the chat's group)."""
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
    return _plan(chat, user, message, request, allowed_models, client_functions=client_functions)


def _plan(
    chat: Chat,
    user: User,
    message: Message,
    request: dict,
    allowed_models: frozenset[str] | None,
    *,
    client_functions: list[dict] | None = None,
    program: ProgramTurn | None = None,
) -> PromptPlan:
    """A stored message's plan: its model request, the chat's key and tools, the models allowed, who the
    calls are for (the user and the chat's group), the client's function names, the program's turn."""
    return PromptPlan(
        message,
        request,
        secret_decrypt(chat.api_key_encrypted),
        list(chat.tools),
        allowed_models,
        program=program,
        caller=Caller(user.pk, chat.group_id),
        client_functions=functions.function_names(client_functions or []),
    )


@transaction.atomic
def message_start(
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
    """Store an ordinary chat's prompt and plan its model call: the chat's context cut to fit, its
    settings and tools, the client's functions. An off-the-record note is stored as complete and plans
    no call."""
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
    messages = ai.build_messages(prompt, context, chat.system_prompt or None)
    return _chat_plan(chat, user, message, messages, allowed_models, response_format, client_functions or [])


@transaction.atomic
def message_resume(
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
    return _chat_plan(chat, user, message, messages, allowed_models, response_format, client_functions)


@transaction.atomic
def program_turn_start(
    *, chat: Chat, user: User, prompt: str | None, allowed_models: frozenset[str] | None
) -> PromptPlan:
    """A turn of the chat's program: claimed (or refused) before anything is stored. The opening turn
    (no prompt) is the program's own message, with no author."""
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
    return _plan(chat, user, message, request, allowed_models, program=turn)
