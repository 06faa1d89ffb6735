"""Chat programs on chats: one turn per prompt, resumed by replaying the recorded steps.

A chat bound to a program (`/chat/create` with `program=`) keeps a ChatProgram row: the program's
name and context, its recorded steps (the inputs it was given and the replies it generated, in
order), its memory and the message it waits on. A turn (the opening one at creation, then one per
prompt) re-runs the program from the start: recorded inputs answer its GetUserInput, recorded replies
answer its Generate (no model call), and nothing it shows is shown again. Past the recorded steps it
runs live: Generate streams to the members like an ordinary reply, Assistant messages and the
GetUserInput message are added to the turn's message, and at the next GetUserInput (or the end) the
turn's steps, memory and status are saved with the message in one transaction. Any process can take
the next turn, so a program survives restarts and runs across processes.

A program must therefore be deterministic given its context, inputs and generated replies; a replay that
asks for something else than what was recorded fails the turn. A turn that fails records nothing: the
program waits where it waited before, and the chat stays usable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from chats.models import Chat, ChatProgram
from chats.options import settings_apply
from chats.programs.library import (
    Assistant,
    BaseMemory,
    GetUserInput,
    ProgramError,
    Runtime,
    runtime_reset,
    runtime_use,
)
from chats.programs.memory import ChatMemory
from chats.programs.registry import program_get, programs
from chats.reply import PromptPlan, QuietReply, reply_stream
from proxy import tools
from proxy.gateway import GatewayError
from turbo_site.core.errors import Conflict, Invalid
from turbo_site.core.text import unstorable_text

logger = logging.getLogger("turbo.programs")

PROGRAM_CONTEXT_MAX_BYTES = 16 * 1024
SEPARATOR = "\n\n"  # between the things a program shows in one turn


@dataclass
class ProgramState:
    """The ChatProgram row as the turn started (read before it, so no database during the turn)."""

    chat_id: object
    name: str
    context: dict
    steps: list[dict]
    memory: list[dict]
    memory_steps: int

    @property
    def committed(self) -> int:
        return len(self.steps)


@dataclass
class TurnResult:
    steps: list[dict]
    status: str
    asking: str = ""
    memory: list[dict] | None = None  # for ChatMemory: saved with the steps
    after_save: list = field(default_factory=list)  # persistent memories written after the commit


def program_context_check(value) -> dict:
    """A program's context: a JSON object (or its text) of at most PROGRAM_CONTEXT_MAX_BYTES; Invalid otherwise."""
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise Invalid("program_context: must be a JSON object") from None
    if not isinstance(value, dict):
        raise Invalid("program_context: must be a JSON object")
    if problem := unstorable_text(value):  # kept with the chat: Postgres's jsonb refuses NUL
        raise Invalid(f"program_context: may not hold {problem}")
    if len(json.dumps(value)) > PROGRAM_CONTEXT_MAX_BYTES:
        raise Invalid(f"program_context: may be at most {PROGRAM_CONTEXT_MAX_BYTES} bytes as JSON")
    return value


def program_check(name: str) -> None:
    """Invalid (400) unless `name` is a registered program."""
    if program_get(name) is None:
        raise Invalid(f"program: no program named {name!r}; registered: {', '.join(sorted(programs()))}")


def program_bind(*, chat: Chat, name: str, context: dict) -> None:
    """Make `chat` (being created, in the caller's transaction) run the program `name`."""
    program_check(name)
    chat.program = name
    chat.save(update_fields=["program"])
    ChatProgram.objects.create(chat=chat, name=name, context=context, status=ChatProgram.Status.WAITING, memory_steps=0)


def turn_claim(*, chat: Chat, prompt: str | None) -> ProgramState:
    """Take the chat's program for one turn (in the caller's transaction); refuse while another turn
    runs (409 program_busy) or once it has finished (409 program_finished)."""
    state = ChatProgram.objects.select_for_update().get(chat_id=chat.pk)
    now = timezone.now()
    if state.status == ChatProgram.Status.FINISHED:
        raise Conflict(
            f"this chat's program {state.name!r} has finished; create a new chat to run it again",
            code="program_finished",
        )
    if state.status == ChatProgram.Status.RUNNING and state.lease_until and state.lease_until > now:
        raise Conflict(
            f"the chat's program {state.name!r} is still taking its turn; send the prompt when it has answered",
            code="program_busy",
        )
    if prompt is None and (state.steps or state.asking):
        raise Conflict(f"the chat's program {state.name!r} has already started", code="program_started")
    state.status = ChatProgram.Status.RUNNING
    state.lease_until = now + timedelta(seconds=settings.PROGRAM_TURN_SECONDS)
    state.save(update_fields=["status", "lease_until", "updated_at"])
    return ProgramState(chat.pk, state.name, state.context, list(state.steps), list(state.memory), state.memory_steps)


def turn_save(*, chat_id, result: TurnResult | None) -> None:
    """The end of a turn, in the transaction that saves its message: record it, or (None: it failed)
    leave the program waiting where it was."""
    if result is None:
        ChatProgram.objects.filter(chat_id=chat_id).update(
            status=ChatProgram.Status.WAITING, lease_until=None, updated_at=timezone.now()
        )
        return
    fields = {"steps": result.steps, "status": result.status, "asking": result.asking, "lease_until": None}
    if result.memory is not None:
        fields.update(memory=result.memory, memory_steps=len(result.steps))
    ChatProgram.objects.filter(chat_id=chat_id).update(**fields, updated_at=timezone.now())


class ChatRuntime(Runtime):
    """Runs one turn of a chat's program: replays recorded steps, then streams live."""

    def __init__(self, *, turn: ProgramTurn, reply):
        super().__init__()
        self.turn = turn
        self.state = turn.state
        self.reply = reply
        self.steps = list(turn.state.steps) + ([{"input": turn.prompt}] if turn.prompt is not None else [])
        self.cursor = 0
        self.top_memory: BaseMemory | None = None
        self.shown_by_stream = False  # the next Assistant the top program yields was already streamed

    @property
    def replaying(self) -> bool:
        return self.cursor < len(self.steps)

    def _recorded(self, kind: str):
        entry = self.steps[self.cursor]
        if kind not in entry:
            raise ProgramError(
                f"the program asked for {'input' if kind == 'input' else 'a reply'} where its recorded steps hold "
                f"{'an input' if 'input' in entry else 'a reply'}: it must do the same again given the same "
                "context, inputs and replies"
            )
        self.cursor += 1
        return entry[kind]

    def input_next(self) -> str | None:
        """The recorded input for the GetUserInput the program reached, or None: wait here (live)."""
        return self._recorded("input") if self.replaying else None

    def memory_for(self, *, top, declared):
        if not top:
            return super().memory_for(top=top, declared=declared)
        self.top_memory = ChatMemory() if declared is None else super().memory_for(top=top, declared=declared)
        return self.top_memory

    async def generate(self, *, messages, options, model, top, forward) -> str:
        if self.replaying:
            return self._recorded("generate")
        if len(self.steps) >= settings.PROGRAM_MAX_STEPS:
            raise ProgramError(
                f"the program has reached PROGRAM_MAX_STEPS ({settings.PROGRAM_MAX_STEPS}) recorded steps"
            )
        plan = self.turn.plan
        request = settings_apply(
            {
                "model": model or plan.request["model"],
                "messages": messages,
                "user": plan.request.get("user"),
                "stream_options": {"include_usage": True},
            },
            self.turn.chat_settings,
            options,
        )
        if plan.allowed_tools:
            request["tools"] = tools.openai_tools(plan.allowed_tools)
        visible = top and forward
        if visible and self.reply.text:
            await self.reply.add(SEPARATOR)
        text = await reply_stream(plan, request, self.reply if visible else QuietReply(self.reply.usage))
        self.shown_by_stream = visible
        self.steps.append({"generate": text})
        self.cursor += 1
        return text

    async def show(self, text: str) -> None:
        await self.reply.add((SEPARATOR if self.reply.text else "") + text)


@dataclass
class ProgramTurn:
    """One turn of a chat's program: `prompt` is None for the opening turn."""

    state: ProgramState
    prompt: str | None
    chat_settings: dict
    plan: PromptPlan | None = None  # the model call's plan (model, user tag, tools, key, limits)

    async def run(self, plan, reply) -> TurnResult:
        self.plan = plan
        program = program_get(self.state.name)
        if program is None:
            raise GatewayError(f"the chat's program {self.state.name!r} is no longer registered", status=503)
        runtime = ChatRuntime(turn=self, reply=reply)
        token = runtime_use(runtime)
        app = None
        try:
            app = program(self.state.context)
            result = await self._step(runtime, app)
        except GatewayError:
            raise
        except Exception as exc:
            logger.exception("chat program %r failed in chat %s", self.state.name, self.state.chat_id)
            raise GatewayError(
                f"the chat program {self.state.name!r} failed: {type(exc).__name__}: {exc}"[:1000],
                status=502,
                code="program_failed",
            ) from None
        finally:
            if app is not None:
                try:
                    await app.aclose()
                except Exception:
                    logger.warning("chat program %r did not close cleanly", self.state.name, exc_info=True)
            runtime_reset(token)
        if isinstance(runtime.top_memory, ChatMemory):
            result.memory = await runtime.top_memory.get_dicts()
        elif runtime.top_memory is not None and hasattr(runtime.top_memory, "turn_end"):
            result.after_save.append(runtime.top_memory)
        return result

    async def _step(self, runtime: ChatRuntime, app) -> TurnResult:
        sent = None
        while True:
            try:
                output = await app.asend(sent)
            except StopAsyncIteration:
                if runtime.replaying:
                    raise ProgramError("the program ended before it used all of its recorded steps") from None
                return TurnResult(runtime.steps, ChatProgram.Status.FINISHED)
            sent = None
            if isinstance(output, GetUserInput):
                sent = runtime.input_next()
                if sent is None:
                    await runtime.show(output.message)
                    return TurnResult(runtime.steps, ChatProgram.Status.WAITING, asking=output.message)
            elif isinstance(output, Assistant):
                if runtime.shown_by_stream:
                    runtime.shown_by_stream = False
                elif not runtime.replaying:
                    await runtime.show(output.content)
            # System and User messages are the program's memory, not replies.


async def turn_after_save(result: TurnResult | None) -> None:
    """Write the persistent memories kept outside the database (a failure only means a replay rebuilds them)."""
    if result is None:
        return
    for memory in result.after_save:
        try:
            await memory.turn_end(len(result.steps))
        except Exception as exc:
            logger.warning("a program memory could not be saved (the next turn rebuilds it): %s", exc)


__all__ = [
    "ChatRuntime",
    "ProgramTurn",
    "program_bind",
    "program_context_check",
    "turn_after_save",
    "turn_claim",
    "turn_save",
]
