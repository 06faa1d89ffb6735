"""The edges of the WebSocket side: an unknown path closes 4404, a backing service that is away closes
1013 (try again later); neither is a 500 with a traceback in the log."""

import re
import shutil
import subprocess
import sys
import uuid

import pytest
from channels.testing import WebsocketCommunicator
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import PROJECT_ROOT
from turbo_site.tests.test_health import free_port, wait_for


@pytest.mark.parametrize("path", ["/nope", "/chat/streamx", "/ws/extra", "/graphqlx", "/"])
async def test_an_unknown_websocket_path_closes_4404(path):
    from turbo_site.asgi import application

    communicator = WebsocketCommunicator(application, path)
    connected, _ = await communicator.connect()
    assert connected
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4404}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_a_handshake_while_redis_is_away_closes_1013(cli_env, tmp_path):
    """Turbo on a Redis that is not there (as after it stopped): the chat stream and /ws close 1013."""
    log = tmp_path / "turbo.log"
    port = free_port()
    env = {**cli_env, "REDIS_ADDRESS": f"redis://127.0.0.1:{free_port()}/0", "DEBUG": "0", "SECRET_KEY": "k" * 50}
    with open(log, "w") as output:
        turbo = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "turbo_site.asgi:application", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(f"http://127.0.0.1:{port}", turbo)
        for path in (f"/chat/stream?id={uuid.uuid4()}&token=some-token", "/ws?token=some-token"):
            with pytest.raises(ConnectionClosed) as closed:
                with connect(f"ws://127.0.0.1:{port}{path}", open_timeout=20) as socket:
                    socket.recv(timeout=20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013, path
    finally:
        turbo.terminate()
        turbo.wait(timeout=20)
    text = log.read_text()
    assert "Traceback" not in text and not re.search(r"\b500\b", text), text
