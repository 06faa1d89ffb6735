"""Chat programs as async generators, after the turbo-chat library, running through Turbo's model path.

A program is an async generator decorated with `@turbo()`. It yields messages (`System`, `User`,
`Assistant`) to build its memory, `Generate(...)` to have the model answer that memory (the reply is
sent back into the generator), and `GetUserInput(message=...)` to wait for the user's input (sent back
the same way). `run(program, input)` steps a program until it asks for input or ends and returns
`(output, done)`; programs compose by running one inside another.

Differences from turbo-chat, on purpose:
- The decorated program passes every message it yields downstream too, so a parent that runs a
  sub-program (`run(sub(context))`) receives the sub-program's messages; a program that ends without
  `Generate` makes no model call of its own (turbo-chat made one, which a mixin did not expect).
- `Generate` takes `settings` (validated like a chat's, see chats.options), `model` and `forward`
  (turbo-chat 0.1's `yield_downstream`): with forward=False the reply goes into memory only.
- The model is reached through Turbo's gateway (routing, failover, limits), never with a key of its
  own. Outside a chat, Generate asks the gateway without streaming; inside a chat (chats.programs.runner)
  the top-level program's replies stream to the chat's members.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable
from functools import wraps
from typing import Any, Literal

import pydantic

__all__ = [
    "Assistant",
    "BaseMemory",
    "Generate",
    "GetUserInput",
    "ListMemory",
    "PrefixMessage",
    "ProgramError",
    "System",
    "User",
    "run",
    "turbo",
]

Context = dict[str, Any] | None


class ProgramError(Exception):
    """A program did something Turbo cannot run (an unknown yield, an empty input, bad settings...)."""


# --- what a program yields -------------------------------------------------------------------------


class PrefixMessage(pydantic.BaseModel):
    """One message of a program's memory."""

    role: str
    content: str

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


class System(PrefixMessage):
    role: Literal["system"] = "system"


class User(PrefixMessage):
    role: Literal["user"] = "user"


class Assistant(PrefixMessage):
    role: Literal["assistant"] = "assistant"


MESSAGE_TYPES = {"system": System, "user": User, "assistant": Assistant}


def message_from(data: dict) -> PrefixMessage:
    return MESSAGE_TYPES[data["role"]](content=data["content"])


class Generate(pydantic.BaseModel):
    """Have the model answer the memory so far; the reply (an Assistant) is sent back into the program."""

    settings: dict[str, Any] = {}
    model: str | None = None
    forward: bool = True  # pass the reply downstream (and, in a chat, show it to the members)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _seed_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "yield_downstream" in data:  # turbo-chat 0.1's name
            data = {**data, "forward": data.pop("yield_downstream")}
        return data


class GetUserInput(pydantic.BaseModel):
    """Wait for the user's input; it is sent back into the program as a string."""

    message: str = "User input needed"


# --- memory ------------------------------------------------------------------------------------------


class BaseMemory(ABC):
    """Where a program keeps its messages between steps (and, if `persistent`, between turns)."""

    # A persistent memory keeps its messages from one turn of a chat to the next; when it is in step
    # with the chat's recorded steps (`in_step`), replaying those steps does not append them again.
    persistent = False
    in_step = False

    async def init(self, context: Context) -> None:  # noqa: B027 - optional hook
        """Called once when the program starts, with its context."""

    @abstractmethod
    async def append(self, item: PrefixMessage) -> None: ...

    @abstractmethod
    async def clear(self) -> None: ...

    @abstractmethod
    async def get(self) -> list[PrefixMessage]: ...

    async def extend(self, items: list[PrefixMessage]) -> None:
        for item in items:
            await self.append(item)

    async def get_dicts(self) -> list[dict]:
        return [message.as_dict() for message in await self.get()]


class ListMemory(BaseMemory):
    """Messages in a list, for one run of the program."""

    def __init__(self, messages: list[PrefixMessage] | None = None):
        self.messages: list[PrefixMessage] = list(messages or [])

    async def append(self, item: PrefixMessage) -> None:
        self.messages.append(item)

    async def clear(self) -> None:
        self.messages = []

    async def get(self) -> list[PrefixMessage]:
        return list(self.messages)


# --- how a program reaches the model -----------------------------------------------------------------


class Runtime:
    """Where programs run. This default one, outside any chat, asks the gateway directly; a chat's
    turn (chats.programs.runner) replaces it to replay recorded steps and stream replies."""

    replaying = False

    def __init__(self) -> None:
        self._top_claimed = False

    def claim_top(self) -> bool:
        """True for the first program started here: the one whose replies members see."""
        first = not self._top_claimed
        self._top_claimed = True
        return first

    def memory_for(self, *, top: bool, declared: BaseMemory | type[BaseMemory] | None) -> BaseMemory:
        if declared is None:
            return ListMemory()
        return declared() if isinstance(declared, type) else copy.deepcopy(declared)

    async def generate(
        self, *, messages: list[dict], options: dict, model: str | None, top: bool, forward: bool
    ) -> str:
        from chats.options import settings_apply
        from proxy import completion

        request = settings_apply({"messages": messages}, options)
        if model:
            request["model"] = model
        return (await completion.complete_collect(request)).completion.text


_runtime: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar("turbo_program_runtime", default=None)


def runtime_current() -> Runtime:
    runtime = _runtime.get()
    if runtime is None:
        runtime = Runtime()
        _runtime.set(runtime)
    return runtime


def runtime_use(runtime: Runtime) -> contextvars.Token:
    return _runtime.set(runtime)


def runtime_reset(token: contextvars.Token) -> None:
    _runtime.reset(token)


def _settings_checked(settings: dict, where: str) -> dict:
    from rest_framework import serializers

    from chats.options import settings_validate

    try:
        return settings_validate(settings)
    except serializers.ValidationError as exc:
        detail = exc.detail[0] if isinstance(exc.detail, list) else exc.detail
        raise ProgramError(f"{where}: {detail}") from None


# --- the decorator and the runner --------------------------------------------------------------------

TurboGen = AsyncGenerator[Any, Any]


def turbo(
    memory: BaseMemory | type[BaseMemory] | None = None,
    model: str | None = None,
    **settings: Any,
) -> Callable[[Callable[..., TurboGen]], Callable[..., TurboGen]]:
    """Make a chat program of an async generator `fn(context)` or `fn(context, memory)`.

    `memory`: a BaseMemory (a class or an instance, copied per run); by default a list for this run, or,
    for the program a chat runs, the chat's own (kept in the database). `model` and `settings`
    (temperature, max_tokens, ...) apply to every Generate, which may override them.
    """
    defaults = _settings_checked(settings, "@turbo settings") if settings else {}

    def wrap(fn: Callable[..., TurboGen]) -> Callable[..., TurboGen]:
        takes_memory = len(inspect.signature(fn).parameters) >= 2

        @wraps(fn)
        async def program(context: Context = None) -> TurboGen:
            runtime = runtime_current()
            top = runtime.claim_top()
            store = runtime.memory_for(top=top, declared=memory)
            await store.init(context)
            generator = fn(context, store) if takes_memory else fn(context)
            sent: Any = None
            while True:
                try:
                    output = await generator.asend(sent)
                except StopAsyncIteration:
                    return
                sent = None
                if isinstance(output, PrefixMessage):
                    if not (runtime.replaying and store.persistent and store.in_step):
                        await store.append(output)
                    yield output
                elif isinstance(output, GetUserInput):
                    sent = yield output
                    if not isinstance(sent, str) or not sent:
                        raise ProgramError("GetUserInput needs a non-empty string as the input")
                elif isinstance(output, Generate):
                    reply = Assistant(
                        content=await runtime.generate(
                            messages=await store.get_dicts(),
                            options={**defaults, **_settings_checked(output.settings, "Generate settings")},
                            model=output.model or model,
                            top=top,
                            forward=output.forward,
                        )
                    )
                    if not (runtime.replaying and store.persistent and store.in_step):
                        await store.append(reply)
                    if output.forward:
                        yield reply
                    sent = reply
                else:
                    raise ProgramError(f"the program yielded {type(output).__name__}, which is not a chat program step")

        program.fn = fn  # the undecorated generator function, as turbo-chat keeps it
        program.is_turbo_program = True
        return program

    return wrap


class GeneratorAlreadyExhaustedError(StopAsyncIteration):
    """run() was called on a program that had already ended."""


async def run(gen: TurboGen, input: str | None = None) -> tuple[Any, bool]:
    """Step `gen` until it asks for input (returns `(GetUserInput, False)`) or ends (returns its last
    output and True). `input` answers the GetUserInput it stopped at last time."""
    output: Any = None
    produced = False
    try:
        while True:
            try:
                output = await gen.asend(input)
            except TypeError as exc:
                if input is None or "just-started" not in str(exc):
                    raise
                output = await gen.asend(None)  # a fresh generator takes None first
            produced = True
            if isinstance(output, GetUserInput):
                return output, False
    except StopAsyncIteration:
        if not produced:
            raise GeneratorAlreadyExhaustedError("the program has already ended") from None
        return output, True
