"""`manage.py programs ...`: list the chat programs, or run one in the terminal against the upstream."""

import asyncio
import sys
from contextlib import aclosing

from django.core.management.base import CommandError

from chats.programs.library import (
    Assistant,
    GetUserInput,
    Runtime,
    runtime_reset,
    runtime_use,
)
from chats.programs.registry import program_get, programs
from chats.programs.runner import program_context_check
from proxy.gateway import GatewayError
from turbo_site.core.commands import ActionCommand, printable, table
from turbo_site.core.errors import Invalid

EXAMPLES = """\
examples:
  manage.py programs list
  manage.py programs run horoscope --context '{"user_id": 1}'
  echo "What does today hold?" | manage.py programs run horoscope
"""


class TerminalRuntime(Runtime):
    """Generate streams the top program's replies to the terminal as they come."""

    def __init__(self, write):
        super().__init__()
        self.write = write
        self.streamed = False

    async def generate(self, *, messages, options, model, top, forward) -> str:
        from chats.options import settings_apply
        from proxy import completion

        request = settings_apply({"messages": messages}, options)
        if model:
            request["model"] = model
        if not (top and forward):
            return (await completion.complete_collect(request)).completion.text
        text = ""
        async with aclosing(completion.complete(request)) as items:
            async for item in items:
                if isinstance(item, completion.Delta) and item.text:
                    self.write(item.text)
                elif isinstance(item, completion.Done):
                    text = item.completion.text
        self.write("\n")
        self.streamed = True
        return text


class Command(ActionCommand):
    help = "List Turbo's chat programs, or run one interactively in the terminal."

    def create_parser(self, prog_name, subcommand, **kwargs):
        kwargs.setdefault("epilog", EXAMPLES)
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_actions(self, actions) -> None:
        self.add_action(actions, "list", "List the registered chat programs: name and where it comes from.")
        run = self.add_action(
            actions,
            "run",
            "Run a program in the terminal.",
            "Run a program in the terminal against the configured upstream: its questions are printed, "
            "your answers read from standard input (a line each), its replies printed as they stream. "
            "It ends when the program does or at the end of the input.",
        )
        run.add_argument("name", metavar="NAME", help="The program's registered name (see `programs list`).")
        run.add_argument("--context", default="{}", help="The program's context, a JSON object.")

    def handle_list(self, **options) -> None:
        rows = [(name, target) for name, (target, _) in sorted(programs().items())]
        self.write_lines(table(("NAME", "SOURCE"), rows))

    def handle_run(self, *, name: str, context: str, **options) -> None:
        program = program_get(name)
        if program is None:
            raise CommandError(f"no program named {printable(name)!r}; registered: {', '.join(sorted(programs()))}")
        try:
            context_value = program_context_check(context or "{}")
        except Invalid as exc:
            raise CommandError(exc.message.replace("program_context:", "--context")) from None
        try:
            asyncio.run(self._run(program, context_value))
        except GatewayError as exc:
            raise CommandError(f"the model call failed: {exc.message}") from exc
        except Exception as exc:  # the program's own code: one line (--traceback shows where)
            raise CommandError(f"the program {name!r} failed: {type(exc).__name__}: {exc}") from exc

    async def _run(self, program, context: dict) -> None:
        def write(text: str) -> None:
            self.stdout.write(text, ending="")
            self.stdout.flush()

        runtime = TerminalRuntime(write)
        token = runtime_use(runtime)
        app = program(context)
        try:
            sent = None
            while True:
                try:
                    output = await app.asend(sent)
                except StopAsyncIteration:
                    return
                sent = None
                if isinstance(output, GetUserInput):
                    write(f"{output.message}\n")
                    while not sent:
                        write("> ")
                        line = await asyncio.to_thread(sys.stdin.readline)
                        if not line:  # end of input
                            write("\n")
                            return
                        sent = line.rstrip("\r\n")
                elif isinstance(output, Assistant):
                    if runtime.streamed:
                        runtime.streamed = False
                    else:
                        write(output.content + "\n")
        finally:
            await app.aclose()
            from turbo_site.core.loops import loop_clients_close

            await loop_clients_close()
            runtime_reset(token)
