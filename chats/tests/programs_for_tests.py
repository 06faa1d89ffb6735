"""Chat programs the tests register through CHAT_PROGRAMS."""

from chats.programs import Assistant, Generate, GetUserInput, RedisMemory, System, User, run, turbo


@turbo()
async def looper(context):
    """Answers every input, remembering the whole conversation (in the chat's memory, the database)."""
    yield System(content="You repeat after the user.")
    while True:
        text = yield GetUserInput(message="Say something")
        yield User(content=text)
        yield Generate()


@turbo(memory=RedisMemory)
async def redis_looper(context):
    """looper, with its memory in Redis."""
    yield System(content="You repeat after the user.")
    while True:
        text = yield GetUserInput(message="Say something")
        yield User(content=text)
        yield Generate()


async def greeting(context):
    """A plain async generator used as a mixin."""
    yield System(content=f"You help with {context['topic']}.")


@turbo(temperature=0.2)
async def summarize(context):
    """A sub-program with its own memory and its own model call."""
    yield User(content=f"echo: notes on {context['topic']}")
    yield Generate()


@turbo()
async def composed(context):
    async for message in greeting(context):
        yield message
    notes, done = await run(summarize(context))
    assert done and isinstance(notes, Assistant)
    yield Assistant(content=f"Notes: {notes.content}")
    question = yield GetUserInput(message="Your question?")
    yield User(content=question)
    yield Generate(settings={"max_tokens": 50})


@turbo()
async def broken(context):
    """Fails on demand: "boom" raises, "odd" yields something that is not a step."""
    while True:
        text = yield GetUserInput(message="Go on")
        if text == "boom":
            raise RuntimeError("the program broke on purpose")
        if text == "odd":
            yield 42
        yield User(content=text)
        yield Generate()


async def undecorated(context):
    """Registered without @turbo: Turbo runs it as if it had it."""
    text = yield GetUserInput(message="Name?")
    yield Assistant(content=f"Hello, {text}!")
