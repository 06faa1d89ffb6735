"""The chat programs Turbo ships: the turbo-chat library's horoscope example, and a tutor that answers in a loop."""

from chats.programs.library import Generate, GetUserInput, System, User, run, turbo


# Get user
async def get_user(id):
    return {"zodiac": "pisces"}


# Set user zodiac mixin
@turbo()
async def set_user_zodiac(context: dict):
    user_id: int = context["user_id"]
    user_data: dict = await get_user(user_id)
    zodiac: str = user_data["zodiac"]

    yield User(content=f"My zodiac sign is {zodiac}")


# Horoscope app (the turbo-chat library's example as it is written there)
@turbo()
async def horoscope(context: dict):
    yield System(content="You are a fortune teller")

    while response := await run(set_user_zodiac(context)):
        output, done = response
        yield output
        if done:
            break

    # Prompt runner to ask for user input
    input = yield GetUserInput(message="What do you want to know?")

    # Yield the input
    yield User(content=input)

    # Generate (overriding the temperature)
    value = yield Generate(settings={"temperature": 0.9})  # noqa: F841 - as in the example


@turbo()
async def tutor(context: dict):
    """Asks for a topic, then answers every question in turn, remembering the conversation."""
    subject = (context or {}).get("subject", "anything the student asks about")
    yield System(content=f"You are a patient tutor for {subject}. Answer briefly and check understanding.")
    question = yield GetUserInput(message="What would you like to learn today?")
    while True:
        yield User(content=question)
        yield Generate()
        question = yield GetUserInput(message="Anything else?")
