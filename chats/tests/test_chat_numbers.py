"""A user's chats are numbered 1, 2, 3... (the conversation API's ids): creations at the same moment,
from many server threads or processes, never collide on a number."""

import threading

import pytest
from django.db import connection

from accounts.models import User
from chats.models import Chat
from chats.services import chat_create

# Transactional: the creators are threads with connections of their own, as server threads are; they must
# see the committed owner and race each other on the database, which the test's own transaction would hide
# (and, on SQLite, hold the write lock they wait for).
pytestmark = pytest.mark.django_db(transaction=True)

CREATORS = 40


def test_forty_chats_created_at_once_by_one_user_all_get_their_own_number():
    owner = User.objects.create_user(username="many-chats", password="x")
    start = threading.Barrier(CREATORS)
    failures: list[BaseException] = []

    def create(index: int) -> None:
        try:
            start.wait()
            chat_create(owner=owner, name=f"chat {index}")
        except BaseException as exc:  # noqa: BLE001 - every failure is the finding
            failures.append(exc)
        finally:
            connection.close()  # each thread has its own connection, as each server thread does

    threads = [threading.Thread(target=create, args=(index,)) for index in range(CREATORS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    numbers = sorted(Chat.objects.filter(owner=owner).values_list("number", flat=True))
    assert numbers == list(range(1, CREATORS + 1))
