"""A reply as it grows: the model's answer streamed through the completion service (proxy.completion)
into a Reply, which tells the chat's members at each step, or into a QuietReply nobody sees.

`reply_stream` is the loop over one model call: the tools the model asks for run between rounds (their
records shown), a json_schema reply that fails its schema is asked for again (members see the `retry`),
and a call to one of the client's own functions ends the turn. A PromptPlan, read from the database
before the call starts (chats.prompts), says what the call may use.
"""

from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chats.models import Message
from chats.stream import MESSAGE_DELTA, ReplyEvents, aevent_send, message_event
from proxy import completion
from proxy.gateway.windows import turn_start
from proxy.usage.caller import Caller
from turbo_site.core.streams import StreamUnavailable

if TYPE_CHECKING:
    from chats.programs.runner import ProgramTurn


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
class Reply:
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


async def reply_stream(plan: PromptPlan, request: dict, reply: Reply | QuietReply) -> str:
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
            client_functions=plan.client_functions,
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
