"""The production stack as shipped: Debian's nginx with deploy/nginx/turbo.conf (only its ports rewritten) in
front of two web processes started by deploy/entrypoint.sh (`make migrate static` once, then `make serve`
twice) on Postgres + Redis. Through the proxy: a streamed group chat followed over SSE and WebSocket, a
/v1 stream, the caller's address from X-Forwarded-For, and a collected static file."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from django.conf import settings
from django.db import connection

from chats.tests.processes import SSEFollower, WSFollower, bearer, free_port, wait_for
from conftest import PROJECT_ROOT, SERVER_KEY

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
SITE = PROJECT_ROOT / "deploy" / "nginx" / "turbo.conf"
UPSTREAM = PROJECT_ROOT / "deploy" / "nginx" / "upstream.conf"
ENTRYPOINT = PROJECT_ROOT / "deploy" / "entrypoint.sh"

STACK_MARKS = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(NGINX is None, reason="needs Debian's nginx (make nginx-deps)"),
    # Two processes share only what Postgres and Redis share; the embedded leg has neither.
    pytest.mark.skipif(
        not settings.REDIS_ADDRESS or connection.vendor != "postgresql",
        reason="needs DB_ADDRESS=postgresql://... and REDIS_ADDRESS",
    ),
]


def through_the_stack(test):
    """A test through the running stack: it needs nginx, Postgres and Redis, and cleans the database after."""
    for mark in STACK_MARKS:
        test = mark(test)
    return test


def site_on(listen: int, logs: Path) -> str:
    """The shipped site, listening on `listen` instead of 80, its access log in `logs`."""
    text = SITE.read_text()
    assert text.count("    listen 80;\n") == 1, "the shipped site's port moved: update the test"
    assert text.count("/var/log/nginx/") == 1
    return text.replace("    listen 80;\n", f"    listen 127.0.0.1:{listen};\n").replace("/var/log/nginx/", f"{logs}/")


def upstream_on(servers: list[int]) -> str:
    """The shipped upstream with its two servers on the ports given."""
    text = UPSTREAM.read_text()
    shipped = re.findall(r"^    server 127\.0\.0\.1:\d+;\n", text, flags=re.M)
    assert len(shipped) == len(servers) == 2, "the shipped upstream changed: update the test"
    for line, port in zip(shipped, servers, strict=True):
        text = text.replace(line, f"    server 127.0.0.1:{port};\n")
    return text


def nginx_main(prefix: Path) -> str:
    """A main nginx.conf of the test's own: everything under `prefix`, workers as the current user."""
    user = "root root" if os.getuid() == 0 else ""  # as root, workers would otherwise drop to nobody
    return f"""
{"user " + user + ";" if user else ""}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    include /etc/nginx/mime.types;
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/upstream.conf;
    include {prefix}/turbo.conf;
}}
"""


class Stack:
    def __init__(self, tmp: Path, upstream_url: str):
        db = connection.settings_dict
        password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
        self.tmp = tmp
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "turbo_site.settings",
            "DEBUG": "0",
            "SECRET_KEY": "nginx-stack-test-key-" + "x" * 40,
            "DB_ADDRESS": f"postgresql://{db['USER']}{password}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "REDIS_ADDRESS": settings.REDIS_ADDRESS,
            "OPENAI_API_URL": upstream_url + "/v1",
            "OPENAI_API_KEY": SERVER_KEY,
            "STATIC_ROOT": str(tmp / "static"),
            "TRUSTED_PROXIES": "127.0.0.1",
        }
        self.processes: list[subprocess.Popen] = []
        self.url = ""
        self.access_log = tmp / "nginx" / "turbo-access.log"

    def start(self) -> str:
        migrated = subprocess.run(
            [str(ENTRYPOINT), "migrate"], env=self.env, capture_output=True, text=True, timeout=600
        )
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        ports = [free_port(), free_port()]
        for port in ports:
            self.spawn([str(ENTRYPOINT), "web"], f"web-{port}.log", ADDRESS=f"127.0.0.1:{port}")
        for port in ports:
            wait_for(lambda port=port: self.answers(f"http://127.0.0.1:{port}/info"), 120, f"the server on {port}")
        listen = free_port()
        prefix = self.tmp / "nginx"
        prefix.mkdir()
        (prefix / "turbo.conf").write_text(site_on(listen, prefix))
        (prefix / "upstream.conf").write_text(upstream_on(ports))
        main = prefix / "nginx.conf"
        main.write_text(nginx_main(prefix))
        checked = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(main)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        self.spawn([NGINX, "-p", str(prefix), "-c", str(main), "-g", "daemon off;"], "nginx.log")
        url = f"http://127.0.0.1:{listen}"
        wait_for(lambda: self.answers(url + "/info"), 30, "nginx")
        return url

    def spawn(self, command: list[str], log: str, **env: str) -> None:
        with open(self.tmp / log, "wb") as output:
            self.processes.append(
                subprocess.Popen(
                    command,
                    cwd=PROJECT_ROOT,
                    env={**self.env, **env},
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # make, its shell and uvicorn: one group, stopped together
                )
            )

    def answers(self, url: str) -> bool:
        for process in self.processes:
            assert process.poll() is None, f"{process.args} exited:\n{self.logs()}"
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def logs(self) -> str:
        return "\n".join(f"== {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in self.tmp.glob("*.log"))

    def stop(self) -> None:
        # SIGTERM to make alone, as systemd (KillMode=mixed) and `docker stop` send it: make passes it on
        # to uvicorn once, which then shuts down gracefully. Whatever is left of a group is then killed.
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(fake_upstream, django_db_setup, django_db_blocker, tmp_path_factory):
    """The running stack, shared by the module's tests."""
    with django_db_blocker.unblock():
        stack = Stack(tmp_path_factory.mktemp("stack"), fake_upstream.url)
        try:
            stack.url = stack.start()
            yield stack
        finally:
            stack.stop()


@pytest.fixture
def proxy_url(stack) -> str:
    """nginx's address."""
    return stack.url


def signed_up(http: httpx.Client, username: str) -> dict:
    signed = http.post("/user/signup", data={"username": username, "password": "correct-horse"})
    assert signed.status_code == 200, signed.text
    return signed.json()


@through_the_stack
def test_a_group_chat_streams_through_the_proxy_to_sse_and_websocket_subscribers(proxy_url, upstream, stack):
    with httpx.Client(base_url=proxy_url, timeout=20) as http:
        owner = signed_up(http, "stack-owner")
        member = signed_up(http, "stack-member")
        chat = http.post("/chat/create", data={"name": "behind nginx"}, headers=bearer(owner["token"])).json()
        added = http.post(
            "/chat/user/add", data={"id": chat["id"], "user_id": member["user"]["id"]}, headers=bearer(owner["token"])
        )
        assert added.status_code == 200, added.text
        # Two requests to the same upstream land on either process: the subscribers and the prompt are apart.
        sse = SSEFollower(proxy_url, member["token"], chat["id"])
        ws = WSFollower(proxy_url, member["token"], chat["id"])
        try:
            prompt = "[scenario:gated] echo: one two three four"
            sent = http.post(
                "/chat/prompt",
                data={"id": chat["id"], "prompt": prompt, "stream": "true"},
                headers=bearer(owner["token"]),
            )
            assert sent.status_code == 200, sent.text
            # The upstream holds the reply after its first word: that word reaching both subscribers
            # shows that nothing on the way (nginx's buffers included) waits for the end of the stream.
            for follower in (sse, ws):
                first = follower.until(lambda event: event.get("type") == "message.delta")[-1]
                assert first["message"]["reply"] == "one "
            upstream.release()
            for follower in (sse, ws):
                final = follower.until(lambda event: event.get("type") in ("message.completed", "message.failed"))[-1]
                assert final["type"] == "message.completed"
                assert final["message"]["reply"] == "one two three four"
        finally:
            upstream.release()
            ws.close()

    # The WebSocket's `?token=` (and the chat id beside it) stays out of nginx's access log.
    # nginx logs a request when it ends: the closed WebSocket's line comes once both sides have closed.
    def stream_logged() -> str:
        text = stack.access_log.read_text()
        return text if "GET /chat/stream HTTP/1.1" in text else ""

    logged = wait_for(stream_logged, 10, "the stream's line in the access log")
    assert member["token"] not in logged and "token=" not in logged


@through_the_stack
def test_a_v1_stream_passes_the_proxy_event_by_event(proxy_url, upstream):
    with httpx.Client(base_url=proxy_url, timeout=20) as http:
        token = signed_up(http, "stack-v1")["token"]
        body = {
            "model": "gpt-4o",
            "stream": True,
            "messages": [{"role": "user", "content": "[scenario:gated] echo: alpha beta gamma"}],
        }
        with http.stream("POST", "/v1/chat/completions", json=body, headers=bearer(token)) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            # The upstream holds the rest after "alpha": a buffering proxy would stall here (a read timeout).
            assert any("alpha" in line for line in lines)
            upstream.release()
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert "gamma" in "".join(rest)


@through_the_stack
def test_the_callers_address_comes_from_x_forwarded_for_of_the_trusted_proxy(proxy_url):
    with httpx.Client(base_url=proxy_url, timeout=20) as http:
        # The client's own X-Forwarded-For is kept, and nginx appends its peer (the test, 127.0.0.1): Turbo
        # trusts 127.0.0.1 (TRUSTED_PROXIES) and so takes the hop before it.
        signed = http.post(
            "/user/signup",
            data={"username": "stack-address", "password": "correct-horse"},
            headers={"X-Forwarded-For": "203.0.113.7"},
        )
        assert signed.status_code == 200, signed.text
        session = http.post("/user/session", headers=bearer(signed.json()["token"])).json()["session"]
    assert session["client_ip"] == "203.0.113.7"


@through_the_stack
def test_static_files_have_hashed_names_gzip_and_a_long_cache(proxy_url):
    with httpx.Client(base_url=proxy_url, timeout=20) as http:
        page = http.get("/login")
        assert page.status_code == 200
        hashed = re.findall(r"/static/turbo/[\w-]+\.[0-9a-f]{12}\.css", page.text)
        assert hashed, page.text[:2000]
        response = http.get(hashed[0], headers={"Accept-Encoding": "gzip"})
        plain = http.get(hashed[0], headers={"Accept-Encoding": "identity"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/css")
    assert response.headers["content-encoding"] == "gzip"
    assert "max-age=315360000" in response.headers["cache-control"]
    assert "immutable" in response.headers["cache-control"]
    assert "content-encoding" not in plain.headers
    assert response.content == plain.content  # httpx decodes the gzip: the same file either way


def test_the_container_files_start_what_this_test_runs():
    """No Docker engine runs here: compose.yaml and the Dockerfile are held to the entrypoint, make targets
    and nginx files the stack test above runs, so that they cannot drift apart unseen."""
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["deploy/entrypoint.sh"]' in dockerfile
    assert "make install REQUIREMENTS=requirements.txt" in dockerfile and "make static" in dockerfile
    entrypoint = ENTRYPOINT.read_text()
    compose = yaml.safe_load((PROJECT_ROOT / "compose.yaml").read_text())
    turbo = {name: service for name, service in compose["services"].items() if service.get("build") == "."}
    assert {name: service["command"] for name, service in turbo.items()} == {
        "migrate": ["migrate"],
        "web1": ["web"],
        "web2": ["web"],
        "grpc": ["grpc"],
    }
    for command in ("migrate", "web", "grpc"):
        assert f"    {command})" in entrypoint
    for name in ("web1", "web2", "grpc"):
        assert turbo[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    nginx = compose["services"]["nginx"]
    mounted = [volume.split(":")[0] for volume in nginx["volumes"]]
    assert mounted == ["./deploy/nginx/turbo.conf", "./deploy/nginx/upstream-compose.conf"]
    upstream = (PROJECT_ROOT / "deploy" / "nginx" / "upstream-compose.conf").read_text()
    assert re.findall(r"server (\w+):8000;", upstream) == ["web1", "web2"]
    assert turbo["web1"]["environment"]["ADDRESS"] == "0.0.0.0:8000"
    address = nginx["networks"]["turbo"]["ipv4_address"]
    assert turbo["web1"]["environment"]["TRUSTED_PROXIES"] == address  # nginx's X-Forwarded-* believed
