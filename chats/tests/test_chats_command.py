"""`manage.py chats` and the message_delete service behind `chats delete-message`."""

import io
import uuid
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from accounts.services import user_create
from chats.models import Chat, ChatMember, Message
from chats.services import message_delete
from groups.models import GroupMember
from testing.commands import manage
from turbo_site.core.errors import NotFound

pytestmark = pytest.mark.django_db

LONG_REPLY = "The first line of a long answer.\n" + "word " * 200 + "THE-END"


def chats(*args: str) -> str:
    """Run `manage.py chats ARGS` in this process; returns its stdout."""
    out = io.StringIO()
    call_command("chats", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.fixture
def chat():
    """A group chat of alice (owner) and bob with three messages, created newest first."""
    alice = user_create(username="alice", password="correct-horse")
    bob = user_create(username="bob", password="correct-horse")
    chat = Chat.objects.create(
        name="Trip planning",
        model="gpt-test",
        owner=alice,
        group=alice.owned_groups.get(),
        system_prompt="You are a travel agent. " * 20,
    )
    ChatMember.objects.create(chat=chat, user=alice)
    ChatMember.objects.create(chat=chat, user=bob)
    start = timezone.now() - timedelta(hours=1)
    for minutes, author, prompt, reply, is_otr in [
        (3, alice, "and the hotel?", "Book early.", False),
        (2, bob, "off the record: I hate flying", "", True),
        (1, alice, "where to go in May?", LONG_REPLY, False),
    ]:
        message = Message.objects.create(chat=chat, author=author, prompt=prompt, reply=reply, is_otr=is_otr)
        Message.objects.filter(pk=message.pk).update(created_at=start + timedelta(minutes=minutes))
    return chat


def test_show_prints_the_chat_and_its_counts(chat):
    out = chats("show", str(chat.pk))

    assert f"id:            {chat.pk}" in out
    assert "name:          Trip planning" in out
    assert "model:         gpt-test" in out
    assert f"owner:         alice ({chat.owner_id})" in out
    assert f"group:         Personal ({chat.group_id})" in out
    assert "members:       2" in out
    assert "messages:      3" in out
    system_prompt = next(line for line in out.splitlines() if line.startswith("system prompt:"))
    assert system_prompt.endswith("…") and len(system_prompt) < 130


def test_show_unknown_chat_fails():
    missing = uuid.uuid4()
    with pytest.raises(CommandError, match=f"no chat with id {missing}"):
        chats("show", str(missing))


def test_show_malformed_id_fails():
    with pytest.raises(CommandError, match="'123' is not a valid chat id"):
        chats("show", "123")


def test_members_lists_everyone_who_can_see_the_chat_and_how(chat):
    carol = user_create(username="carol", password="correct-horse")
    GroupMember.objects.create(group=chat.group, user=carol)  # in the chat's group, not in the chat
    user_create(username="dave", password="correct-horse")  # neither: not listed

    out = chats("members", str(chat.pk))

    header, *rows = out.splitlines()
    assert header.split() == ["USER", "ID", "USERNAME", "ACCESS", "JOINED"]
    assert [row.split()[:3] for row in rows] == [
        [str(chat.owner_id), "alice", "owner"],
        [str(ChatMember.objects.get(chat=chat, user__username="bob").user_id), "bob", "member"],
        [str(carol.pk), "carol", "group"],
    ]
    assert "md5$" not in out and "pbkdf2" not in out


def test_messages_oldest_first_with_reply_cut_short(chat):
    out = chats("messages", str(chat.pk))

    blocks = out.split("\n\n")
    assert [block.splitlines()[1] for block in blocks] == [
        "  prompt: where to go in May?",
        "  prompt: off the record: I hate flying",
        "  prompt: and the hotel?",
    ]
    first_header, _, first_reply = blocks[0].splitlines()
    message = Message.objects.get(prompt="where to go in May?")
    assert first_header.split() == [str(message.pk), *first_header.split()[1:4], "alice", "complete"]
    assert first_reply.startswith("  reply:  The first line of a long answer. word word")
    assert first_reply.endswith("…") and "THE-END" not in out
    assert blocks[1].splitlines()[0].endswith("bob  complete  off-the-record")
    assert "off-the-record" not in blocks[0] + blocks[2]
    assert all(len(line) < 130 for line in out.splitlines())


def test_messages_full_prints_everything(chat):
    out = chats("messages", str(chat.pk), "--full")

    assert "  reply:  The first line of a long answer.\n          word word" in out
    assert "THE-END" in out


def test_messages_of_an_empty_chat_say_so(chat):
    Message.objects.filter(chat=chat).delete()

    assert chats("messages", str(chat.pk)) == f"chat {chat.pk} has no messages\n"


def test_delete_message_removes_the_row_and_forgets_the_context(chat):
    message = Message.objects.get(prompt="and the hotel?")
    cache.set(f"chat-context:{chat.pk}", ["stale context"])

    out = chats("delete-message", str(message.pk))

    assert out == f"deleted message {message.pk}\n"
    assert not Message.objects.filter(pk=message.pk).exists()
    assert Message.objects.filter(chat=chat).count() == 2
    assert cache.get(f"chat-context:{chat.pk}") is None


def test_delete_unknown_message_fails_and_deletes_nothing(chat):
    with pytest.raises(CommandError, match="no message with id"):
        chats("delete-message", str(uuid.uuid4()))

    assert Message.objects.filter(chat=chat).count() == 3


@pytest.mark.parametrize("message_id", [uuid.uuid4(), "not-a-uuid"])
def test_message_delete_service_raises_not_found(chat, message_id):
    cache.set(f"chat-context:{chat.pk}", ["context"])

    with pytest.raises(NotFound):
        message_delete(message_id=message_id)

    assert Message.objects.filter(chat=chat).count() == 3
    assert cache.get(f"chat-context:{chat.pk}") == ["context"]


# --- as an operator runs it: manage.py's entry point, exit status and streams -----------------------
# In this process (testing.commands); what a fresh process adds is checked once, for every
# operator command, in accounts/tests/test_users_command.py.


def test_cli_show_and_delete_message():
    owner = user_create(username="olivia", password="correct-horse")
    chat = Chat.objects.create(name="Ops chat", model="gpt-test", owner=owner)
    ChatMember.objects.create(chat=chat, user=owner)
    message_id = str(Message.objects.create(chat=chat, author=owner, prompt="ping", reply="pong").pk)

    shown = manage("chats", "show", str(chat.pk))
    deleted = manage("chats", "delete-message", message_id)
    again = manage("chats", "delete-message", message_id)

    assert shown.returncode == 0 and "name:          Ops chat" in shown.stdout
    assert deleted.returncode == 0 and deleted.stdout == f"deleted message {message_id}\n"
    assert again.returncode == 1
    assert again.stderr.splitlines() == [f"CommandError: no message with id {message_id}"]
    assert not Message.objects.filter(pk=message_id).exists()


@pytest.mark.parametrize(
    ("args", "returncode", "line"),
    [
        (["members"], 2, "manage.py chats members: error: the following arguments are required: CHAT_ID"),
        (["show", "123"], 2, "manage.py chats show: error: argument CHAT_ID: '123' is not a valid chat id (a UUID)"),
        (
            ["show", "00000000-0000-0000-0000-000000000000"],
            1,
            "CommandError: no chat with id 00000000-0000-0000-0000-000000000000",
        ),
    ],
)
def test_cli_errors_are_one_line_on_stderr(args, returncode, line):
    done = manage("chats", *args)

    assert done.returncode == returncode
    assert done.stderr.splitlines() == [line]
    assert done.stdout == ""


def test_cli_help_lists_the_subcommands():
    done = manage("chats", "--help")

    assert done.returncode == 0
    for name in ("show", "members", "messages", "delete-message"):
        assert f"    {name} " in done.stdout
