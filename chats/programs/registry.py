"""Chat programs by name: the built-in ones, then CHAT_PROGRAMS (name=module.path:attribute pairs)."""

import functools
import importlib
from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from chats.programs.library import turbo

BUILTIN = {
    "horoscope": "chats.programs.builtin:horoscope",
    "tutor": "chats.programs.builtin:tutor",
}


def _load(name: str, target: str) -> Callable:
    module_path, _, attribute = target.partition(":")
    try:
        program = getattr(importlib.import_module(module_path), attribute)
    except (ImportError, AttributeError) as exc:
        raise ImproperlyConfigured(f"CHAT_PROGRAMS: {name}={target} cannot be loaded: {exc}") from exc
    if not callable(program):
        raise ImproperlyConfigured(f"CHAT_PROGRAMS: {name}={target} is not a program (an async generator function)")
    if not getattr(program, "is_turbo_program", False):
        program = turbo()(program)  # a plain async generator function runs as @turbo() would
    return program


@functools.cache
def _programs(configured: tuple[str, ...]) -> dict[str, tuple[str, Callable]]:
    targets = dict(BUILTIN)
    for pair in configured:
        name, _, target = pair.partition("=")
        targets[name] = target
    return {name: (target, _load(name, target)) for name, target in targets.items()}


def programs() -> dict[str, tuple[str, Callable]]:
    """{name: (module.path:attribute, program)}; raises ImproperlyConfigured for one that cannot load."""
    return _programs(tuple(settings.CHAT_PROGRAMS))


def program_get(name: str) -> Callable | None:
    entry = programs().get(name)
    return entry[1] if entry else None
