"""Peers: other OpenAI-compatible proxies measured with the same load as Turbo. For now, LiteLLM.

LiteLLM's proxy lives in its own virtualenv (bench/.venv-litellm, git-ignored), created once with the
Python that runs the benchmark and reused while it holds LITELLM_REQUIREMENT. It is started with a
config.yaml in the run's temporary folder whose only model is the fake upstream, as an OpenAI-compatible
provider; no database, no callbacks, logging at ERROR, and every start-up download turned off.
"""

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PEERS = ("litellm",)
LITELLM_REQUIREMENT = "litellm[proxy]==1.106.2"
LITELLM_VENV = PROJECT / "bench" / ".venv-litellm"
LITELLM_MARKER = LITELLM_VENV / ".bench-installed"
# Importing LiteLLM's proxy takes 15-35 s of CPU on a busy 2-core machine.
LITELLM_STARTUP_S = 300
# Without these LiteLLM fetches its model cost map (and other tables) from the internet at start-up, and
# retries three times before it falls back to the copy in the package; "PRODUCTION" keeps it from
# loading a .env file from any parent folder.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    "LITELLM_MODE": "PRODUCTION",
    "LITELLM_LOG": "ERROR",
}
# What must not leak into LiteLLM from the caller's environment: a database, a cache, keys.
LITELLM_ENV_DROPPED = ("DATABASE_URL", "DIRECT_URL", "DATABASE_URL_READ_REPLICA", "REDIS_URL", "REDIS_HOST")
LITELLM_ENV_DROPPED += ("REDIS_PORT", "REDIS_PASSWORD", "LITELLM_MASTER_KEY", "LITELLM_SALT_KEY", "OPENAI_API_KEY")

CONFIG = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {api_base}
      api_key: sk-bench
litellm_settings:
  set_verbose: false
  json_logs: false
  callbacks: []
  success_callback: []
  failure_callback: []
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
  disable_spend_logs: true
"""


@dataclass
class Peer:
    name: str
    label: str
    command: list[str]
    env: dict[str, str]
    token: str
    health_path: str
    startup_s: float
    info: dict


def litellm_venv(log=print) -> Path:
    """bench/.venv-litellm with LITELLM_REQUIREMENT, created or updated when needed; its python."""
    python = LITELLM_VENV / "bin" / "python"
    marker = LITELLM_MARKER.read_text().strip() if LITELLM_MARKER.exists() else ""
    if python.exists() and marker == LITELLM_REQUIREMENT:
        return python
    if not python.exists():
        log(f"creating {LITELLM_VENV.relative_to(PROJECT)} for LiteLLM (once)")
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    log(f"installing {LITELLM_REQUIREMENT} into {LITELLM_VENV.relative_to(PROJECT)} (once; about a minute)")
    uv = Path(sys.executable).parent / "uv"
    if uv.exists():
        command = [str(uv), "pip", "install", "--quiet", "--python", str(python), LITELLM_REQUIREMENT]
    else:
        command = [str(python), "-m", "pip", "install", "--quiet", LITELLM_REQUIREMENT]
    installed = subprocess.run(command, capture_output=True, text=True)
    if installed.returncode != 0:
        raise RuntimeError(f"installing {LITELLM_REQUIREMENT} failed:\n{installed.stderr[-3000:]}")
    LITELLM_MARKER.write_text(LITELLM_REQUIREMENT + "\n")
    return python


def litellm_facts(python: Path) -> dict:
    """LiteLLM's version and the event loop and HTTP parser its uvicorn will use (it forces uvloop)."""
    probe = (
        "import importlib.metadata as m, importlib.util as u, json; "
        "print(json.dumps({'version': m.version('litellm'), 'uvicorn': m.version('uvicorn'), "
        "'loop': 'uvloop' if u.find_spec('uvloop') else 'asyncio', "
        "'http': 'httptools' if u.find_spec('httptools') else 'h11'}))"
    )
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    return json.loads(found.stdout) if found.returncode == 0 else {}


def litellm_peer(*, work: Path, port: int, upstream_url: str, model: str = "bench-model", log=print) -> Peer:
    """Installs LiteLLM if needed and returns how to start its proxy in front of `upstream_url`."""
    python = litellm_venv(log)
    folder = work / "litellm"
    folder.mkdir(exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(CONFIG.format(model=model, api_base=upstream_url))
    master_key = "sk-" + secrets.token_urlsafe(24)
    env = {key: value for key, value in os.environ.items() if key not in LITELLM_ENV_DROPPED}
    env.update(LITELLM_ENV, LITELLM_MASTER_KEY=master_key)
    # The venv's console script; with one worker it runs uvicorn in its own process, no children.
    command = [str(python.parent / "litellm"), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--config", str(config), "--num_workers", "1"]
    info = {"requirement": LITELLM_REQUIREMENT, "workers": 1, "database": None, **litellm_facts(python)}
    return Peer(
        name="litellm",
        label="LiteLLM",
        command=command,
        env=env,
        token=master_key,
        health_path="/health/liveliness",
        startup_s=LITELLM_STARTUP_S,
        info=info,
    )
