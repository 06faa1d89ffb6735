"""`manage.py <command> ...` run in the test's own process, as an operator's shell sees it.

A subprocess per call costs a fresh interpreter and django.setup() (seconds each on a loaded 2-core
machine), and most command tests call several. `manage()` goes through the same entry point as
`manage.py` (`fetch_command` + `run_from_argv`): the parser built as from the command line (our one-line
usage errors, exit 2), `CommandError: ...` on stderr with exit 1, `--help` printed and exit 0. What it
returns has the fields of `subprocess.CompletedProcess` that the tests read.

The database is the test's own (pytest-django), so the rows a test makes are the rows the command sees,
and both are rolled back after. Settings come from the test (the `settings` fixture), not from env vars.
Tests that need a real process boundary (a fresh interpreter's start-up, a signal, a second process on the
same database) keep using `conftest.run_manage`.
"""

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from unittest import mock

from django.core.management import ManagementUtility
from django.db import connections


@dataclass
class Ran:
    """The outcome of one `manage()` call, named like subprocess.CompletedProcess's fields."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def manage(*args: str, stdin: str = "") -> Ran:
    """Run `manage.py *args` in process, `stdin` its standard input; its exit status, stdout and stderr."""
    argv = ["manage.py", *args]
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    # run_from_argv closes every connection when the command ends, which a process about to exit wants;
    # here it would close the connection holding the test's transaction.
    with (
        redirect_stdout(stdout),
        redirect_stderr(stderr),
        mock.patch("sys.stdin", io.StringIO(stdin)),
        mock.patch.object(connections, "close_all"),
    ):
        try:
            # Built inside the redirect: a command's OutputWrappers bind sys.stdout/sys.stderr when made.
            ManagementUtility(argv).fetch_command(args[0]).run_from_argv(argv)
        except SystemExit as exit_:
            if isinstance(exit_.code, str):  # sys.exit("message"): Python prints it and exits 1
                stderr.write(exit_.code + "\n")
                returncode = 1
            else:
                returncode = exit_.code or 0
    return Ran(argv, returncode, stdout.getvalue(), stderr.getvalue())
