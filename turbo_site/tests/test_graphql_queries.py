"""Database queries of a GraphQL request do not grow with the length of its lists (dataloaders).

Requests run through the whole ASGI app in process (the `new_client` fixture, testing/inprocess.py), whose
`database_sync_to_async` calls run on this thread's connection, which CaptureQueriesContext watches.
Counts, never the clock.
"""

import httpx
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chats.models import Chat, ChatMember, Message
from conftest import unique_name
from groups.models import Group, GroupMember

pytestmark = pytest.mark.django_db

# Every link the types have, in lists: chats with their owner, group (its members, its chats, their
# owners) and messages (their author and chat); groups with members and chats.
QUERY = """{
  chats {
    id name owner { username }
    group { name owner { id } members { username } chats { id owner { id } } }
    messages(last: 3) { hasPrevious nodes { reply author { username } chat { id } } }
  }
  groups { name members { id } chats { id group { id } } }
}"""


def graphql_client(new_client, settings) -> tuple[httpx.Client, str]:
    settings.SESSION_CACHE_SECONDS = 3600  # the token's lookup stays cached, as in steady use
    response = new_client().post("/user/signup", data={"username": unique_name("gql"), "password": "correct-horse"})
    assert response.status_code == 200, response.text
    body = response.json()
    return new_client(headers={"Authorization": f"Bearer {body['token']}"}), body["user"]["id"]


def populate(user_id: str, chats: int) -> None:
    """`chats` chats of the user, each in its own group with two other members, holding 4 messages each."""
    from accounts.models import User

    for n in range(chats):
        others = [User.objects.create(username=unique_name("member")) for _ in range(2)]
        group = Group.objects.create(owner_id=user_id, name=f"group {n}")
        GroupMember.objects.bulk_create(
            [GroupMember(group=group, user_id=user_id)] + [GroupMember(group=group, user=other) for other in others]
        )
        chat = Chat.objects.create(owner_id=user_id, name=f"chat {n}", model="gpt-4o-mini", group=group)
        ChatMember.objects.create(chat=chat, user_id=user_id)
        Message.objects.bulk_create(
            [Message(chat=chat, author=others[i % 2], prompt=f"p{i}", reply=f"r{i}") for i in range(4)]
        )


def run(client: httpx.Client) -> tuple[dict, list[str]]:
    with CaptureQueriesContext(connection) as queries:
        response = client.post("/graphql", json={"query": QUERY})
    assert response.status_code == 200, response.text
    body = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"], [query["sql"] for query in queries.captured_queries]


def test_query_count_is_constant_in_list_length(new_client, settings):
    counts = {}
    for size in (2, 8):
        client, user_id = graphql_client(new_client, settings)
        populate(user_id, size)
        assert client.post("/graphql", json={"query": "{ me { user { id } } }"}).status_code == 200
        data, queries = run(client)
        assert len(data["chats"]) == size
        assert all(len(chat["messages"]["nodes"]) == 3 and chat["messages"]["hasPrevious"] for chat in data["chats"])
        assert all(len(chat["group"]["members"]) == 3 for chat in data["chats"])
        # the user's own first group (signup's) is listed too
        assert len(data["groups"]) == size + 1
        counts[size] = len(queries)
    assert counts[2] == counts[8], counts
    assert 5 <= counts[8] <= 15, counts  # seen on this connection (so counted), and few
