"""`manage.py chats ...`: inspect a chat, its members and messages; delete a message; sweep abandoned replies.

Replaces the old admin CLI's `chat`, `chatUsers`, `messages` and `deleteMessage`. Member listings show
no password hashes, and deleting a message also forgets the chat's cached context.
"""

import json
import uuid

from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.management.base import CommandError

from chats import selectors
from chats.models import Chat, Message
from chats.services import message_delete
from chats.sweeper import messages_sweep
from turbo_site.core.commands import ActionCommand, fields, one_line, printable, table, uuid_argument, when

# How much of a system prompt, prompt or reply fits on a line without --full.
PREVIEW_WIDTH = 100

EXAMPLES = """\
examples:
  manage.py chats show 5f0c8a9e-8f3b-4d8e-9a43-2b7f1f0e3c21
  manage.py chats members 5f0c8a9e-8f3b-4d8e-9a43-2b7f1f0e3c21
  manage.py chats messages 5f0c8a9e-8f3b-4d8e-9a43-2b7f1f0e3c21 --full
  manage.py chats delete-message 9d2b4c1e-6a7f-4f0b-8c3d-1e2f3a4b5c6d
  manage.py chats sweep
"""


def _chat_get(chat_id: uuid.UUID) -> Chat:
    chat = Chat.objects.select_related("owner", "group").filter(pk=chat_id).first()
    if chat is None:
        raise CommandError(f"no chat with id {chat_id}")
    return chat


def _indented(label: str, text: str) -> list[str]:
    """`label: text`, the text's further lines indented under its first."""
    first, *rest = printable(text).splitlines() or [""]
    return [f"  {label + ':':<7} {first}".rstrip()] + [f"  {'':<7} {line}".rstrip() for line in rest]


class Command(ActionCommand):
    help = "Inspect Turbo chats: show one, list its members or messages; delete a message; sweep abandoned replies."

    def create_parser(self, prog_name, subcommand, **kwargs):
        kwargs.setdefault("epilog", EXAMPLES)
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_actions(self, actions) -> None:
        chat_id_help = "The chat's UUID."

        show = self.add_action(
            actions,
            "show",
            "Show one chat: name, model, owner, group, system prompt, dates and counts.",
        )
        show.add_argument("chat_id", metavar="CHAT_ID", type=uuid_argument("chat"), help=chat_id_help)

        members = self.add_action(
            actions,
            "members",
            "List everyone who can see a chat: user id, username, access (owner, member, group), when they joined.",
        )
        members.add_argument("chat_id", metavar="CHAT_ID", type=uuid_argument("chat"), help=chat_id_help)

        messages = self.add_action(
            actions,
            "messages",
            "List a chat's messages, oldest first.",
            "List a chat's messages, oldest first: id, time, author, status, off-the-record flag, then the "
            f"prompt and reply cut to {PREVIEW_WIDTH} characters on one line each (see --full).",
        )
        messages.add_argument("chat_id", metavar="CHAT_ID", type=uuid_argument("chat"), help=chat_id_help)
        messages.add_argument("--full", action="store_true", help="Print prompts and replies whole, line by line.")

        delete = self.add_action(
            actions,
            "delete-message",
            "Delete one message for good and forget its chat's cached context.",
        )
        delete.add_argument(
            "message_id", metavar="MESSAGE_ID", type=uuid_argument("message"), help="The message's UUID."
        )

        self.add_action(
            actions,
            "sweep",
            "End messages left 'streaming' by a server process that died.",
            "End the messages left 'streaming' whose generation runs in no process (no alive mark for a minute): "
            "each becomes 'error' with the reply as far as the chat stream still has it, and members get "
            "message.failed. Every server process also does this at start and every SWEEP_SECONDS.",
        )

    def handle_show(self, *, chat_id: uuid.UUID, **options) -> None:
        chat = _chat_get(chat_id)
        group = f"{chat.group.name} ({chat.group_id})" if chat.group else "-"
        self.write_lines(
            fields(
                [
                    ("id", str(chat.pk)),
                    ("name", chat.name),
                    ("model", chat.model),
                    ("owner", f"{chat.owner.username} ({chat.owner_id})"),
                    ("group", group),
                    ("system prompt", one_line(chat.system_prompt, PREVIEW_WIDTH) or "-"),
                    ("settings", one_line(json.dumps(chat.settings), PREVIEW_WIDTH) if chat.settings else "-"),
                    ("program", chat.program or "-"),
                    ("created", when(chat.created_at)),
                    ("updated", when(chat.updated_at)),
                    ("members", str(chat.memberships.count())),
                    ("messages", str(chat.messages.count())),
                ]
            )
        )

    def handle_members(self, *, chat_id: uuid.UUID, **options) -> None:
        chat = _chat_get(chat_id)
        users = selectors.chat_users(chat=chat)
        rows = [(str(user.pk), user.username, user.access, when(user.joined_at)) for user in users]
        self.write_lines(table(("USER ID", "USERNAME", "ACCESS", "JOINED"), rows))

    def handle_messages(self, *, chat_id: uuid.UUID, full: bool, **options) -> None:
        chat = _chat_get(chat_id)
        messages = Message.objects.filter(chat=chat).select_related("author").order_by("created_at", "id")
        count = 0
        for message in messages.iterator():
            if count:
                self.stdout.write("")
            count += 1
            if message.author:
                author = message.author.username
            else:  # a program's opening message has no author
                author = "(program)" if chat.program and not message.prompt else "(deleted user)"
            otr = "  off-the-record" if message.is_otr else ""
            self.stdout.write(f"{message.pk}  {when(message.created_at)}  {printable(author)}  {message.status}{otr}")
            lines: list[str] = []
            for label, text in (("prompt", message.prompt), ("reply", message.reply), ("error", message.error)):
                if label == "error" and not text:
                    continue
                if full:
                    lines += _indented(label, text)
                else:
                    lines.append(f"  {label + ':':<7} {one_line(text, PREVIEW_WIDTH)}".rstrip())
            self.write_lines(lines)
        if not count:
            self.stdout.write(f"chat {chat.pk} has no messages")

    def handle_delete_message(self, *, message_id: uuid.UUID, **options) -> None:
        message_delete(message_id=message_id)
        self.stdout.write(f"deleted message {message_id}")

    def handle_sweep(self, **options) -> None:
        if not settings.REDIS_ADDRESS:
            # The alive marks of running replies live in each server process's own memory: from here every
            # reply would look abandoned. The server sweeps by itself at start and every SWEEP_SECONDS.
            raise CommandError(
                "sweep needs REDIS_ADDRESS (the shared cache that says which replies are still being generated); "
                "without it the server process sweeps by itself, at start and every SWEEP_SECONDS"
            )
        ended = async_to_sync(messages_sweep)()
        self.stdout.write(f"ended {ended} abandoned message{'' if ended == 1 else 's'}")
