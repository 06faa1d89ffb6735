"""Every example of the getting-started and API pages runs as printed, in order, against a fresh install
(`make demo`, with `make grpcserve` beside it started from the demo.env it wrote, as the pages say): each
page's shell blocks in one shell in the checkout, so a variable a block sets is there for the next, each
Python block through its real client (the openai SDK, grpcio, websockets) and each JavaScript block with
Node.js through its real client (openai, eventsource, ws, graphql-ws: `make js-deps`). A block preceded
by `<!-- not run: why -->` is not meant to run; on any other page of the docs, every block must say so.

The pages talk to http://localhost:8080 and 127.0.0.1:50051; here those are the demo's own free ports, and
./demo.env the demo's own file. Blocks that use `$TOKEN` before setting it say where it comes from: the
runner gives them a signed-up user's token, as a reader following the pages would have.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import PROJECT_ROOT
from turbo_site.tests.test_first_run import bare_env, zero_config

pytestmark = zero_config  # a fresh install of its own: the same on both legs

# The pages, in the order a reader meets them.
PAGES = [
    "README.md",  # the repository's front page, then the site's pages
    "getting-started.md",
    "api/rest.md",
    "api/v1.md",
    "api/ws.md",
    "api/graphql.md",
    "api/grpc.md",
    "keys-and-budgets.md",
]
BLOCK = re.compile(r"(<!-- not run: [^>]*-->\n)?```(sh|python|js)\n(.*?)\n```", re.DOTALL)
TROUBLE = ("Traceback", '"internal_error"')
# The JavaScript clients the examples import, pinned in package-lock.json beside them (`make js-deps`).
JS_CLIENTS = PROJECT_ROOT / "testing" / "js"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def page_text(page: str) -> str:
    return (PROJECT_ROOT / page if page == "README.md" else PROJECT_ROOT / "docs" / page).read_text()


def blocks(page: str) -> list[tuple[str, str]]:
    """(language, code) of the page's blocks that are meant to run."""
    return [(language, code) for marker, language, code in BLOCK.findall(page_text(page)) if not marker]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`make demo` on free ports with a database of its own, and `make grpcserve` beside it."""
    home = tmp_path_factory.mktemp("demo")
    port, fake_port, grpc_port = free_port(), free_port(), free_port()
    env = bare_env(home, TURBO_ENV_FILE=str(home / ".env"))
    processes = []
    try:
        demo = subprocess.Popen(
            ["make", "--no-print-directory", "demo", f"ADDRESS=127.0.0.1:{port}", f"FAKE_PORT={fake_port}"]
            + [f"ENV_FILE={home / '.env'}", f"DEMO_ENV_FILE={home / 'demo.env'}", f"PYTHON={sys.executable}"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=open(home / "demo.log", "wb"),  # noqa: SIM115 (the process writes it until it stops)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes.append(demo)
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            assert demo.poll() is None, (home / "demo.log").read_text()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        # `make grpcserve` in a second shell that sourced demo.env, as the getting-started page says: the
        # fake upstream reaches it through that file only (the shell has no OPENAI_* of its own).
        assert (home / "demo.env").read_text() == (
            f"OPENAI_API_URL=http://127.0.0.1:{fake_port}/v1\nOPENAI_API_KEY=sk-demo-not-a-real-key\n"
        )
        grpcserve = subprocess.Popen(
            ["bash", "-c", 'set -a; . "$1"; set +a; exec make --no-print-directory grpcserve', "-", home / "demo.env"],
            cwd=PROJECT_ROOT,
            env={**env, "GRPC_ADDRESS": f"127.0.0.1:{grpc_port}"},
            stdout=open(home / "grpc.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes.append(grpcserve)
        for _ in range(300):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", grpc_port)) == 0:
                    break
            assert grpcserve.poll() is None, (home / "grpc.log").read_text()
            time.sleep(0.1)
        signed = httpx.post(base + "/user/signup", data={"username": "docs-reader", "password": "correct-horse"})
        assert signed.status_code == 200, signed.text
        yield {"port": port, "grpc_port": grpc_port, "token": signed.json()["token"], "home": home, "env": env}
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def localized(code: str, demo: dict) -> str:
    code = code.replace("./demo.env", str(demo["home"] / "demo.env"))
    code = code.replace("localhost:8080", f"localhost:{demo['port']}")
    code = code.replace("127.0.0.1:8080", f"127.0.0.1:{demo['port']}")
    return code.replace("127.0.0.1:50051", f"127.0.0.1:{demo['grpc_port']}")


def test_every_page_has_examples_to_run():
    counted = {page: len(blocks(page)) for page in PAGES}
    assert sum(counted.values()) >= 8, counted
    assert all(counted.values()), counted  # every page listed has something to run


@pytest.fixture(scope="module")
def node(demo) -> str:
    """Node.js, with the JavaScript clients of `make js-deps` importable from the demo's folder."""
    node = shutil.which("node")
    if node is None or not (JS_CLIENTS / "node_modules").is_dir():
        pytest.fail("the JavaScript examples need node and `make js-deps`", pytrace=False)
    link = demo["home"] / "node_modules"
    if not link.exists():
        link.symlink_to(JS_CLIENTS / "node_modules")
    return node


@pytest.mark.parametrize("page", PAGES)
def test_the_examples_of_a_page_run_as_printed(page, demo, node):
    found = blocks(page)
    assert found, f"{page} has no example to run"
    # The shell of a reader in the checkout beside `make demo`: none of the suite's settings, only the
    # demo's database and .env (a new user's defaults), and the token the pages say to export.
    env = {**demo["env"], "TOKEN": demo["token"], "PYTHONPATH": str(PROJECT_ROOT)}
    shell = [localized(code, demo) for language, code in found if language == "sh"]
    if shell:
        # A block may leave a listener in the background (`curl -N ... &`): it ends with the page.
        script = "set -e -o pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
        script += "\n".join(f"echo '== block {i}'\n{code}" for i, code in enumerate(shell))
        done = subprocess.run(
            ["bash", "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert not any(trouble in output for trouble in TROUBLE), output
    for index, (language, code) in enumerate(found):
        if language == "sh":
            continue
        suffix = {"python": "py", "js": "mjs"}[language]  # .mjs: an ES module (import, top-level await)
        source = Path(demo["home"]) / f"{page.replace('/', '-')}-{index}.{suffix}"
        source.write_text(localized(code, demo))
        command = [sys.executable, str(source)] if language == "python" else [node, str(source)]
        done = subprocess.run(
            command,
            cwd=PROJECT_ROOT if language == "python" else demo["home"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip(), f"{page} block {index} printed nothing"
        assert not any(trouble in done.stdout + done.stderr for trouble in TROUBLE), done.stdout + done.stderr


def test_every_example_elsewhere_in_the_docs_is_marked_as_not_run():
    """A page the runner does not cover holds no runnable-looking block that is not marked: each says why."""
    covered = {PROJECT_ROOT / "docs" / page for page in PAGES} | {PROJECT_ROOT / "README.md"}
    unmarked = {}
    for path in sorted((PROJECT_ROOT / "docs").rglob("*.md")) + [PROJECT_ROOT / "bench" / "README.md"]:
        if path in covered:
            continue
        found = [language for marker, language, _ in BLOCK.findall(path.read_text()) if not marker]
        if found:
            unmarked[str(path.relative_to(PROJECT_ROOT))] = found
    assert not unmarked, unmarked


def test_every_page_shows_javascript_for_each_api_front():
    """The fronts a browser or Node.js client talks to show JavaScript too (run above through node)."""
    for page in ("api/rest.md", "api/v1.md", "api/ws.md", "api/graphql.md"):
        assert "js" in [language for language, _ in blocks(page)], page
