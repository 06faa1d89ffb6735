"""`manage.py users`: through call_command, through manage.py's entry point in this process, and once in a
subprocess (what a fresh process adds: start-up, exit status)."""

import io
import re

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts.models import User
from accounts.services import session_create, session_lookup, user_create
from conftest import run_manage
from testing.commands import manage

pytestmark = pytest.mark.django_db

HASH_MARKERS = ("md5$", "pbkdf2", "argon2", "bcrypt", "sha1$")


def users(*args: str) -> tuple[str, str]:
    """Run `manage.py users ARGS` in this process; returns (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    call_command("users", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def assert_no_hash(*outputs: str) -> None:
    for output in outputs:
        for marker in HASH_MARKERS:
            assert marker not in output.lower()


# --- in process -----------------------------------------------------------------------------------


def test_list_prints_one_aligned_line_per_user_without_hashes():
    User.objects.all().delete()
    alice = user_create(username="alice", password="correct-horse", first_name="Alice", last_name="Liddell")
    bob = user_create(username="bob-the-builder", password="correct-horse")
    User.objects.filter(pk=bob.pk).update(is_staff=True)

    out, err = users("list")

    lines = out.splitlines()
    assert len(lines) == 3
    header, *rows = lines
    assert header.split() == ["ID", "USERNAME", "NAME", "JOINED", "STAFF", "ACTIVE"]
    assert rows[0].startswith(str(alice.pk)) and "alice" in rows[0] and "Alice Liddell" in rows[0]
    assert rows[1].startswith(str(bob.pk)) and "bob-the-builder" in rows[1]
    # Aligned: every column starts where its header does.
    for column in ("USERNAME", "JOINED", "STAFF"):
        start = header.index(column)
        assert all(row[start - 2 : start] == "  " and row[start] != " " for row in rows)
    assert rows[0].split()[-2:] == ["no", "yes"]
    assert rows[1].split()[-2:] == ["yes", "yes"]
    assert err == ""
    assert_no_hash(out)


def test_list_without_users_says_so():
    User.objects.all().delete()

    out, _ = users("list")

    assert out == "no users\n"


def test_show_finds_a_user_by_username_in_any_case_or_by_id():
    alice = user_create(username="Alice-Show", password="correct-horse", first_name="Alice")
    session_create(user=alice)
    session_create(user=alice)

    by_name, _ = users("show", "alice-show")
    by_id, _ = users("show", str(alice.pk))

    assert by_name == by_id
    assert f"id:              {alice.pk}" in by_name
    assert "username:        Alice-Show" in by_name
    assert "first name:      Alice" in by_name
    assert "last name:       -" in by_name
    assert "last login:      never" in by_name
    assert "groups:          Personal" in by_name
    assert "active sessions: 2" in by_name
    assert_no_hash(by_name)


@pytest.mark.parametrize("who", ["nobody-here", "00000000-0000-0000-0000-000000000000", "not-a-uuid-"])
def test_show_unknown_user_fails(who):
    with pytest.raises(CommandError, match="no user with id or username"):
        users("show", who)


def test_create_with_password_makes_the_user_and_their_personal_group():
    out, _ = users("create", "carol", "--password", "correct-horse-battery")

    carol = User.objects.get(username="carol")
    assert carol.check_password("correct-horse-battery")
    assert list(carol.group_memberships.values_list("group__name", flat=True)) == ["Personal"]
    assert out == f"created user 'carol' with id {carol.pk}\n"
    assert "correct-horse-battery" not in out
    assert_no_hash(out)


def test_create_without_password_prints_a_generated_one_once():
    out, _ = users("create", "dave")

    match = re.search(r"generated password \(shown only this once, store it now\): (\S+)$", out, re.MULTILINE)
    assert match, out
    password = match.group(1)
    assert len(password) >= 20
    assert out.count(password) == 1
    assert User.objects.get(username="dave").check_password(password)
    assert_no_hash(out)


def test_create_refuses_a_taken_username_in_any_case():
    user_create(username="erin", password="correct-horse")

    with pytest.raises(CommandError, match="already taken"):
        users("create", "ERIN", "--password", "correct-horse")

    assert User.objects.filter(username__iexact="erin").count() == 1


def test_create_refuses_a_weak_password():
    with pytest.raises(CommandError, match="password"):
        users("create", "frank", "--password", "abc")

    assert not User.objects.filter(username="frank").exists()


def test_reset_sets_the_password_and_revokes_every_session():
    grace = user_create(username="grace", password="correct-horse")
    _, token = session_create(user=grace)
    _, other_token = session_create(user=grace, kind="jwt")
    assert session_lookup(token) is not None

    out, _ = users("reset", "GRACE", "a-new-long-password")

    assert session_lookup(token) is None
    assert session_lookup(other_token) is None
    grace.refresh_from_db()
    assert grace.check_password("a-new-long-password")
    assert "sessions were revoked" in out
    assert "a-new-long-password" not in out
    assert_no_hash(out)


def test_reset_with_a_weak_password_changes_nothing():
    heidi = user_create(username="heidi", password="correct-horse")
    _, token = session_create(user=heidi)

    with pytest.raises(CommandError, match="password"):
        users("reset", "heidi", "abc")

    heidi.refresh_from_db()
    assert heidi.check_password("correct-horse")
    assert session_lookup(token) is not None


def test_reset_unknown_user_fails():
    with pytest.raises(CommandError, match="no user named 'nobody-here'"):
        users("reset", "nobody-here", "a-new-long-password")


def test_missing_argument_is_an_error_not_a_crash():
    with pytest.raises(CommandError, match="required: username"):
        users("create")


# --- as an operator runs it: manage.py's entry point, exit status and streams -----------------------


def test_cli_help_lists_the_subcommands():
    done = manage("users", "--help")

    assert done.returncode == 0
    for name in ("list", "show", "create", "reset"):
        assert re.search(rf"^\s+{name}\s+\S", done.stdout, re.MULTILINE), name
    create_help = manage("users", "create", "--help")
    assert create_help.returncode == 0
    assert "--password" in create_help.stdout


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["create"], "manage.py users create: error: the following arguments are required: username"),
        ([], "manage.py users: error: the following arguments are required: SUBCOMMAND"),
    ],
)
def test_cli_missing_argument_is_one_line_on_stderr(args, line):
    done = manage("users", *args)

    assert done.returncode == 2
    assert done.stderr.splitlines() == [line]
    assert done.stdout == ""


def test_cli_unknown_subcommand_is_one_line_on_stderr():
    done = manage("users", "frobnicate")

    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1
    assert "invalid choice: 'frobnicate'" in done.stderr


def test_cli_unknown_user_is_one_line_on_stderr_of_a_real_process(cli_env):
    """The one subprocess of this module: a fresh process's start-up adds nothing to stderr and exits 1."""
    done = run_manage(cli_env, "users", "show", "nobody-at-all")

    assert done.returncode == 1
    assert done.stderr.splitlines() == ["CommandError: no user with id or username 'nobody-at-all'"]
    assert done.stdout == ""


def test_cli_unknown_user_is_one_line_on_stderr():
    done = manage("users", "show", "nobody-at-all")

    assert done.returncode == 1
    assert done.stderr.splitlines() == ["CommandError: no user with id or username 'nobody-at-all'"]


def test_cli_create_then_list_shows_the_user_and_never_a_hash():
    created = manage("users", "create", "ivan")
    listed = manage("users", "list")

    assert created.returncode == listed.returncode == 0
    assert "generated password" in created.stdout
    assert re.search(r"^[0-9a-f-]{36}\s+ivan\s", listed.stdout, re.MULTILINE), listed.stdout
    for done in (created, listed):
        assert done.stderr == ""
        assert_no_hash(done.stdout)


def test_cli_reset_revokes_sessions():
    judy = user_create(username="judy", password="correct-horse")
    token = session_create(user=judy)[1]

    reset = manage("users", "reset", "judy", "a-new-long-password")

    assert reset.returncode == 0, reset.stderr
    assert "sessions were revoked" in reset.stdout
    assert token not in reset.stdout
    assert_no_hash(reset.stdout)
    assert session_lookup(token) is None
