"""Chat programs: async-generator chat flows (the turbo-chat library's style), run by Turbo on chats (see library.py).

from chats.programs import turbo, System, User, Assistant, Generate, GetUserInput, run
"""

from chats.programs.library import (
    Assistant,
    BaseMemory,
    Generate,
    GeneratorAlreadyExhaustedError,
    GetUserInput,
    ListMemory,
    PrefixMessage,
    ProgramError,
    System,
    User,
    run,
    turbo,
)
from chats.programs.memory import ChatMemory, RedisMemory

__all__ = [
    "Assistant",
    "BaseMemory",
    "ChatMemory",
    "Generate",
    "GeneratorAlreadyExhaustedError",
    "GetUserInput",
    "ListMemory",
    "PrefixMessage",
    "ProgramError",
    "RedisMemory",
    "System",
    "User",
    "run",
    "turbo",
]
