"""TURBO_CONFIG files: what is accepted, and the one line a bad one is refused with."""

import textwrap

import pytest

from proxy.config import ConfigError, load

GOOD = """
upstreams:
  - name: primary
    base_url: http://10.0.0.5:8000
    api_key: ${PRIMARY_KEY}
    timeout: 30
    max_in_flight: 100
  - {name: backup, base_url: "https://backup.example/v1/", api_key: "${BACKUP_KEY:-sk-fallback}"}
models:
  - name: gpt-4o-mini
    strategy: latency
    deployments:
      - {upstream: primary, model: gpt-4o-mini, weight: 3}
      - {upstream: backup, model: gpt-4o-mini-2024-07-18, weight: 1, priority: 1}
    fallbacks: [gpt-4o]
    retries: 1
    cooldown_seconds: 10
    capabilities: [tools]
    context_window: 128000
    price: {input: 0.15, output: 0.60}
  - name: gpt-4o
    deployments: [{upstream: backup}]
  - name: auto
    router: {candidates: [gpt-4o-mini, gpt-4o], pick: fastest}
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "turbo.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_a_good_file_with_environment_values(tmp_path):
    config = load(write(tmp_path, GOOD), environ={"PRIMARY_KEY": "sk-primary"})
    primary, backup = config.upstreams
    assert primary.base_url == "http://10.0.0.5:8000/v1" and primary.api_key == "sk-primary"
    assert primary.timeout == 30 and primary.max_in_flight == 100
    assert backup.base_url == "https://backup.example/v1" and backup.api_key == "sk-fallback"
    mini = config.models["gpt-4o-mini"]
    assert [d.id for d in mini.deployments] == ["primary/gpt-4o-mini", "backup/gpt-4o-mini-2024-07-18"]
    assert mini.strategy == "latency" and mini.retries == 1 and mini.cooldown_seconds == 10
    assert mini.capabilities == {"tools"} and mini.context_window == 128000 and mini.price_output == 0.6
    assert config.models["gpt-4o"].deployments[0].model is None  # the public name is sent
    assert config.models["auto"].router.candidates == ("gpt-4o-mini", "gpt-4o")
    assert config.public_names() == ["gpt-4o-mini", "gpt-4o", "auto"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("strategy: latency", "strategy: random"), "models[0].strategy: must be one of weighted, least_busy, latency"),
        (("retries: 1", "retires: 1"), "models[0].retires: unknown key"),
        (
            ("{upstream: backup}", "{upstream: nowhere}"),
            "models[1].deployments[0].upstream: no upstream named 'nowhere'",
        ),
        (("http://10.0.0.5:8000", "ftp://10.0.0.5"), "upstreams[0].base_url: must be an http:// or https:// URL"),
        (("name: backup", "name: primary"), "upstreams[1].name: duplicate upstream name 'primary'"),
        (("name: gpt-4o\n", "name: gpt-4o-mini\n"), "models[1].name: duplicate model name 'gpt-4o-mini'"),
        (
            ("fallbacks: [gpt-4o]", "fallbacks: [gpt-5]"),
            "models[0].fallbacks[0]: no model with deployments named 'gpt-5'",
        ),
        (("weight: 3", "weight: heavy"), "models[0].deployments[0].weight: must be a number"),
        (("capabilities: [tools]", "capabilities: [telepathy]"), "models[0].capabilities[0]: must be one of"),
        (("pick: fastest", "pick: best"), "models[2].router.pick: must be one of cheapest, fastest"),
        (("${PRIMARY_KEY}", "${MISSING_KEY}"), "upstreams[0].api_key: environment variable MISSING_KEY is not set"),
        (("models:", "modles:"), ": unknown key"),
        (("  - {name: backup", "  - {nme: backup"), "upstreams[1].nme: unknown key"),
    ],
)
def test_a_bad_file_is_refused_in_one_line_naming_the_key(tmp_path, change, message):
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as refused:
        load(path, environ={"PRIMARY_KEY": "sk-primary"})
    text = str(refused.value)
    assert text.startswith(f"TURBO_CONFIG {path}: ") and message in text
    assert "\n" not in text


def test_unreadable_or_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="line 3: not valid YAML"):
        load(write(tmp_path, "upstreams:\n  - [unclosed\n"))
    with pytest.raises(ConfigError, match=": must be a mapping"):
        load(write(tmp_path, "- just a list\n"))
