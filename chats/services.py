"""Writes to chats and their messages, and the prompt flow: store, ask the model, publish.

Every change a chat's members should see goes out on the topic `chat.<id>` through `chat_publish`,
which also keeps a short replay window so that a reconnecting client can resume (SSE Last-Event-ID).
A chat's context (earlier exchanges sent with a new prompt) is cached under `chat-context:<id>`,
rebuilt from the database when missing, extended with each final reply and dropped when messages or
the chat are deleted.
"""

import asyncio
import contextvars
import logging
import uuid
from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from accounts.models import User
from chats import selectors
from chats.models import Chat, ChatMember, Message
from chats.serializers import message_data
from groups.selectors import is_group_member
from proxy import ai, tools
from turbo_site.core.acache import acache_count, acache_set, cache_count
from turbo_site.core.crypto import secret_decrypt, secret_encrypt
from turbo_site.core.errors import Forbidden, NotFound
from turbo_site.core.pubsub import apublish, publish

logger = logging.getLogger("turbo.chats")

CONTEXT_CACHE_PREFIX = "chat-context:"
CONTEXT_CACHE_SECONDS = 3600


def chat_topic(chat_id: uuid.UUID | str) -> str:
    return f"chat.{chat_id}"


def group_topic(group_id: uuid.UUID | str) -> str:
    return f"group.{group_id}"


def model_resolve(model: str | None) -> str:
    """A chat's model: an alias (`gpt-3`, `gpt-4`, see MODEL_ALIASES) or a model name; default DEFAULT_MODEL."""
    if not model:
        return settings.DEFAULT_MODEL
    return settings.MODEL_ALIASES.get(model, model)


# --- the live stream and its replay window --------------------------------------------------------


def _seq_key(chat_id) -> str:
    return f"chat-seq:{chat_id}"


def _replay_key(chat_id, seq: int) -> str:
    return f"chat-event:{chat_id}:{seq}"


def _stamp(chat_id, event: dict) -> dict:
    seq = cache_count(cache, _seq_key(chat_id))
    event = {"seq": seq, **event}
    cache.set(_replay_key(chat_id, seq), event, settings.STREAM_REPLAY_SECONDS)
    return event


async def achat_publish(chat_id, event: dict) -> dict:
    """Number an event, keep it for replay, and send it to every subscriber of the chat.

    On Redis: one round trip for the number, then the replay copy and the publication side by side;
    a client that missed the event reconnects (Last-Event-ID) a round trip later, when both are done.
    """
    seq = await acache_count(_seq_key(chat_id))
    event = {"seq": seq, **event}
    await asyncio.gather(
        acache_set(_replay_key(chat_id, seq), event, settings.STREAM_REPLAY_SECONDS),
        apublish(chat_topic(chat_id), event),
    )
    return event


def chat_publish(chat_id, event: dict) -> None:
    """achat_publish for sync code; sent after the surrounding transaction commits."""

    def send():
        try:
            publish(chat_topic(chat_id), _stamp(chat_id, event))
        except Exception:
            logger.exception("could not publish on chat %s", chat_id)

    transaction.on_commit(send)


def chat_replay(*, chat_id, after_seq: int) -> list[dict]:
    """Events of the chat after `after_seq` still inside the replay window, in order."""
    last = cache.get(_seq_key(chat_id)) or 0
    first = max(after_seq + 1, last - settings.STREAM_REPLAY_MAX + 1)
    if first > last:
        return []
    found = cache.get_many([_replay_key(chat_id, seq) for seq in range(first, last + 1)])
    return [found[key] for key in sorted(found, key=lambda key: int(key.rsplit(":", 1)[1]))]


def _access_changed(chat_ids: list, user_ids: list) -> None:
    """Tell open streams that these users may have lost access (they re-check and close)."""
    control = {"control": "access_changed", "user_ids": [str(u) for u in user_ids]}

    def send():
        for chat_id in chat_ids:
            try:
                publish(chat_topic(chat_id), control)
            except Exception:
                logger.exception("could not publish on chat %s", chat_id)

    transaction.on_commit(send)


# --- context --------------------------------------------------------------------------------------


def _context_key(chat_id) -> str:
    return f"{CONTEXT_CACHE_PREFIX}{chat_id}"


def _chat_context_forget(chat_id) -> None:
    """Drop a chat's cached context, now and again after commit (so no prompt re-caches old rows)."""
    key = _context_key(chat_id)
    cache.delete(key)
    transaction.on_commit(lambda: cache.delete(key))


def chat_context_get(*, chat_id, size: int) -> list[tuple[str, str]]:
    """The newest `size` exchanges, from the cache or rebuilt from the database."""
    if size <= 0:
        return []
    cached = cache.get(_context_key(chat_id))
    if cached is None:
        cached = selectors.chat_context(chat_id=chat_id, size=settings.MAX_CONTEXT)
        cache.set(_context_key(chat_id), cached, CONTEXT_CACHE_SECONDS)
    return [tuple(pair) for pair in cached[-size:]]


def _context_extend(chat_id, prompt: str, reply: str) -> None:
    key = _context_key(chat_id)
    cached = cache.get(key)
    if cached is None:
        return  # rebuilt from the database, reply included, on the next prompt
    cache.set(key, (list(cached) + [(prompt, reply)])[-settings.MAX_CONTEXT :], CONTEXT_CACHE_SECONDS)


def context_fit(context: list[tuple[str, str]], *, prompt: str, system: str) -> list[tuple[str, str]]:
    """Keep the newest exchanges that fit CONTEXT_MAX_CHARS together with the system prompt and prompt."""
    budget = settings.CONTEXT_MAX_CHARS - len(prompt) - len(system)
    kept: list[tuple[str, str]] = []
    for earlier_prompt, earlier_reply in reversed(context):
        cost = len(earlier_prompt) + len(earlier_reply)
        if cost > budget:
            break
        budget -= cost
        kept.append((earlier_prompt, earlier_reply))
    kept.reverse()
    return kept


# --- chats ----------------------------------------------------------------------------------------


def _require_owner(chat: Chat, user: User, action: str) -> None:
    if chat.owner_id != user.pk:
        raise Forbidden(f"only the chat's owner may {action}")


@transaction.atomic
def chat_create(
    *,
    owner: User,
    name: str,
    model: str | None = None,
    group_id: uuid.UUID | None = None,
    system_prompt: str = "",
    tools: list[str] | None = None,
) -> Chat:
    """A new chat owned by `owner` (a member of `group_id`, if given), who is its first member."""
    if group_id is not None and not is_group_member(user=owner, group_id=group_id):
        raise NotFound("group not found")
    chat = Chat.objects.create(
        owner=owner,
        name=name,
        model=model_resolve(model),
        group_id=group_id,
        system_prompt=system_prompt,
        tools=tools or [],
    )
    ChatMember.objects.create(chat=chat, user=owner)
    return chat


@transaction.atomic
def conversation_create(*, owner: User, title: str, model: str | None = None, api_key: str = "") -> Chat:
    """A chat in seed 002's terms; its own upstream key, if given, is stored encrypted."""
    chat = chat_create(owner=owner, name=title, model=model)
    if api_key:
        chat.api_key_encrypted = secret_encrypt(api_key)
        chat.save(update_fields=["api_key_encrypted"])
    return chat


@transaction.atomic
def chat_update(
    *,
    chat: Chat,
    user: User,
    name: str | None = None,
    model: str | None = None,
    system_prompt: str | None = None,
    tools: list[str] | None = None,
) -> Chat:
    """Change a chat's settings (owner only); only the fields given change."""
    _require_owner(chat, user, "change it")
    if name is not None:
        chat.name = name
    if model is not None:
        chat.model = model_resolve(model)
    if system_prompt is not None:
        chat.system_prompt = system_prompt
    if tools is not None:
        chat.tools = tools
    chat.save()
    return chat


@transaction.atomic
def chat_delete(*, chat: Chat, user: User) -> None:
    """Delete a chat with its members and messages (owner only); open streams end."""
    _require_owner(chat, user, "delete it")
    chat_id = chat.pk
    chat.delete()
    _chat_context_forget(chat_id)
    transaction.on_commit(lambda: _publish_quietly(chat_id, {"control": "chat_deleted"}))


def _publish_quietly(chat_id, data: dict) -> None:
    try:
        publish(chat_topic(chat_id), data)
    except Exception:
        logger.exception("could not publish on chat %s", chat_id)


@transaction.atomic
def chat_user_add(*, chat: Chat, user: User, user_id: uuid.UUID) -> None:
    """Add a user to a chat (owner only); the user must exist; adding a member again is a no-op."""
    _require_owner(chat, user, "add users")
    if not User.objects.filter(pk=user_id, is_active=True).exists():
        raise NotFound(f"no such user: {user_id}", code="user_not_found")
    ChatMember.objects.get_or_create(chat=chat, user_id=user_id)


@transaction.atomic
def chat_user_remove(*, chat: Chat, user: User, user_id: uuid.UUID) -> None:
    """Remove a user from a chat (owner only); they lose access at once, open streams included."""
    _require_owner(chat, user, "remove users")
    if user_id == chat.owner_id:
        raise Forbidden("the chat's owner cannot be removed")
    ChatMember.objects.filter(chat=chat, user_id=user_id).delete()
    _access_changed([chat.pk], [user_id])


def group_access_changed(*, group_id: uuid.UUID, user_ids: list[uuid.UUID]) -> None:
    """Users left a group: streams of the group's chats re-check their access."""
    chat_ids = list(Chat.objects.filter(group_id=group_id).values_list("pk", flat=True))
    _access_changed(chat_ids, user_ids)


# --- messages -------------------------------------------------------------------------------------


@transaction.atomic
def message_delete(*, message_id: uuid.UUID | str) -> None:
    """Delete one message for good and forget its chat's cached context.

    Raises NotFound if there is no message with that id (including an id that is not a UUID).
    """
    try:
        message_id = uuid.UUID(str(message_id))
    except ValueError:
        raise NotFound(f"no message with id {message_id!r}") from None
    message = Message.objects.select_for_update().filter(pk=message_id).first()
    if message is None:
        raise NotFound(f"no message with id {message_id}")
    chat_id = message.chat_id
    message.delete()
    _chat_context_forget(chat_id)
    transaction.on_commit(lambda: _publish_quietly(chat_id, {"control": "message_deleted", "id": str(message_id)}))


@dataclass
class PromptPlan:
    """Everything the model call needs, read before it starts (no database during generation)."""

    message: Message
    request: dict
    api_key: str | None
    allowed_tools: list[str]


@transaction.atomic
def _message_start(*, chat: Chat, user: User, prompt: str, context_size: int, otr: bool) -> PromptPlan:
    now = timezone.now()
    message = Message.objects.create(
        chat=chat,
        author=user,
        prompt=prompt,
        model=chat.model,
        is_otr=otr,
        status=Message.Status.COMPLETE if otr else Message.Status.STREAMING,
    )
    Chat.objects.filter(pk=chat.pk).update(updated_at=now)
    if otr:
        return PromptPlan(message, {}, None, [])
    context = context_fit(
        chat_context_get(chat_id=chat.pk, size=context_size), prompt=prompt, system=chat.system_prompt
    )
    request = {
        "model": chat.model,
        "messages": ai.build_messages(prompt, context, chat.system_prompt or None),
        "user": ai.user_tag(user),
    }
    if chat.tools:
        request["tools"] = tools.openai_tools(chat.tools)
    return PromptPlan(message, request, secret_decrypt(chat.api_key_encrypted), list(chat.tools))


def _message_finish(
    *,
    message: Message,
    reply: str,
    status: str,
    error: str = "",
    usage: dict | None = None,
    tool_calls: list[dict] | None = None,
) -> None:
    usage = usage or {}
    message.reply = reply
    message.tool_calls = tool_calls or []
    message.status = status
    message.error = error
    message.prompt_tokens = usage.get("prompt_tokens")
    message.completion_tokens = usage.get("completion_tokens")
    message.total_tokens = usage.get("total_tokens")
    message.save(
        update_fields=[
            "reply",
            "status",
            "error",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "tool_calls",
            "updated_at",
        ]
    )
    if status == Message.Status.COMPLETE and not message.is_otr:
        _context_extend(message.chat_id, message.prompt, reply)


async def _final(message: Message) -> dict:
    return await achat_publish(message.chat_id, {"message": message_data(message), "delta": "", "partial": False})


# Generations running in the background (stream=true), so that they are not garbage-collected.
_generations: set[asyncio.Task] = set()


async def message_prompt(*, chat: Chat, user: User, prompt: str, context_size: int, stream: bool, otr: bool) -> Message:
    """Store a prompt, have the model answer it, and publish the reply to the chat's members.

    With `stream`, this returns at once with the stored message (status "streaming") and the reply is
    generated in the background, its deltas published as they come. Without it, this waits for the
    reply and raises ai.AIError if the upstream fails. Either way the prompt is stored first and never
    lost; a failure marks the message "error", keeping any partial reply.
    """
    plan = await database_sync_to_async(_message_start)(
        chat=chat, user=user, prompt=prompt, context_size=context_size, otr=otr
    )
    message = plan.message
    if otr:
        await _final(message)
        return message
    if stream:
        base = message_data(message)
        await achat_publish(message.chat_id, {"message": base, "delta": "", "partial": True})
        # A fresh context: the task outlives this request, whose thread executor ends with it.
        task = asyncio.get_running_loop().create_task(_generate(plan, base), context=contextvars.Context())
        _generations.add(task)
        task.add_done_callback(_generations.discard)
        return message
    try:
        reply, usage, records = await _answer(plan)
    except ai.AIError as exc:
        await database_sync_to_async(_message_finish)(
            message=message, reply="", status=Message.Status.ERROR, error=exc.message
        )
        await _final(message)
        raise
    await database_sync_to_async(_message_finish)(
        message=message, reply=reply, status=Message.Status.COMPLETE, usage=usage, tool_calls=records
    )
    await _final(message)
    return message


def _add_usage(total: dict, usage: dict | None) -> dict:
    for name, value in (usage or {}).items():
        if isinstance(value, int):
            total[name] = (total.get(name) or 0) + value
    return total


async def _run_tool(call: dict, allowed: list[str]) -> dict:
    name = (call.get("function") or {}).get("name")
    if name not in allowed:  # the model may only use the tools enabled for this chat
        return {"tool_call_id": call.get("id", ""), "content": f"tool {name!r} is not enabled here", "is_error": True}
    return await tools.tool_execute(call)


async def _run_tools(calls: list[dict], allowed: list[str]) -> tuple[list[dict], list[dict]]:
    """Execute tool calls concurrently: (records for the message, `tool` messages for the model)."""
    results = await asyncio.gather(*(_run_tool(call, allowed) for call in calls))
    records = [
        {
            "id": call.get("id", ""),
            "name": (call.get("function") or {}).get("name", ""),
            "arguments": (call.get("function") or {}).get("arguments", ""),
            "result": result["content"],
            "is_error": bool(result.get("is_error")),
        }
        for call, result in zip(calls, results, strict=True)
    ]
    replies = [{"role": "tool", "tool_call_id": r["tool_call_id"], "content": r["content"]} for r in results]
    return records, replies


def _after_tools(request: dict, text: str, calls: list[dict], replies: list[dict]) -> dict:
    assistant = {"role": "assistant", "content": text or None, "tool_calls": calls}
    return {**request, "messages": [*request["messages"], assistant, *replies]}


async def _answer(plan: PromptPlan) -> tuple[str, dict, list[dict]]:
    """The model's final answer, running requested tools for up to MAX_TOOL_ROUNDS rounds."""
    request, usage, records = plan.request, {}, []
    for _ in range(settings.MAX_TOOL_ROUNDS + 1):
        completion = await ai.acreate(request, api_key=plan.api_key)
        _add_usage(usage, completion.usage)
        if not completion.tool_calls:
            return completion.text, usage, records
        new_records, replies = await _run_tools(completion.tool_calls, plan.allowed_tools)
        records += new_records
        request = _after_tools(request, completion.text, completion.tool_calls, replies)
    raise ai.AIError(f"the model was still calling tools after {settings.MAX_TOOL_ROUNDS} rounds", status=502)


async def _generate(plan: PromptPlan, base: dict) -> None:
    """Stream the answer to the chat's members, running requested tools between rounds."""
    message = plan.message
    reply, usage, records = "", {}, []
    status, error = Message.Status.COMPLETE, ""
    request = {**plan.request, "stream_options": {"include_usage": True}}
    try:
        for _ in range(settings.MAX_TOOL_ROUNDS + 1):
            calls: dict[int, dict] = {}
            round_text = ""
            async for chunk in ai.achat_stream(request, api_key=plan.api_key):
                if chunk.get("usage"):
                    _add_usage(usage, chunk["usage"])
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    for piece in delta.get("tool_calls") or []:
                        slot = calls.setdefault(
                            piece.get("index", 0),
                            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                        )
                        slot["id"] = piece.get("id") or slot["id"]
                        function = piece.get("function") or {}
                        slot["function"]["name"] += function.get("name") or ""
                        slot["function"]["arguments"] += function.get("arguments") or ""
                    if delta.get("content"):
                        round_text += delta["content"]
                        reply += delta["content"]
                        snapshot = {**base, "reply": reply, "tool_calls": records}
                        await achat_publish(
                            message.chat_id, {"message": snapshot, "delta": delta["content"], "partial": True}
                        )
            if not calls:
                break
            tool_calls = [calls[index] for index in sorted(calls)]
            new_records, replies = await _run_tools(tool_calls, plan.allowed_tools)
            records += new_records
            snapshot = {**base, "reply": reply, "tool_calls": records}
            await achat_publish(message.chat_id, {"message": snapshot, "delta": "", "partial": True})
            request = _after_tools(request, round_text, tool_calls, replies)
        else:
            raise ai.AIError(f"the model was still calling tools after {settings.MAX_TOOL_ROUNDS} rounds", status=502)
    except ai.AIError as exc:
        status, error = Message.Status.ERROR, exc.message
    except asyncio.CancelledError:
        status, error = Message.Status.ERROR, "interrupted: the server stopped during generation"
        raise
    except Exception:
        logger.exception("generation of message %s failed", message.pk)
        status, error = Message.Status.ERROR, "internal error during generation"
    finally:
        # Saved whether or not anyone is listening, and even when the task is cancelled.
        await asyncio.shield(_save_and_announce(message, reply, status, error, usage, records))


async def _save_and_announce(
    message: Message, reply: str, status: str, error: str, usage: dict, records: list[dict]
) -> None:
    try:
        await database_sync_to_async(_message_finish)(
            message=message, reply=reply, status=status, error=error, usage=usage, tool_calls=records
        )
        await _final(message)
    except Exception:
        logger.exception("could not save message %s", message.pk)


async def generations_stop(*, grace_seconds: float) -> None:
    """Graceful shutdown: let running generations finish for a while, then stop and save the rest."""
    if _generations:
        logger.info("waiting up to %ss for %d generations", grace_seconds, len(_generations))
        _, pending = await asyncio.wait(list(_generations), timeout=grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
