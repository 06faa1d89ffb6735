"""What a model call costs, in USD, exactly: `Decimal` prices per 1M tokens, never floats.

A model's `price:` in TURBO_CONFIG (`input`, `output`, optional `cached_input`) wins; otherwise the
shipped table below for common OpenAI models (a dated name such as `gpt-4o-mini-2024-07-18` is priced
as `gpt-4o-mini`); otherwise a `price:` on the config's `"*"` model. A model with none of these is
counted at DEFAULT_PRICE (or, with UNPRICED_MODELS=refuse, refused while a budget applies), so that no
model is free under a budget.
"""

import re
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings

from proxy.config import ConfigError, config_in_force

PER_TOKENS = Decimal(1_000_000)
_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens (`cached_input` None: cached input tokens cost as input); for the paths priced
    by what they make, USD per image (by `quality/size`, `size` or `*`), per 1M characters of speech
    input, per second of transcribed audio."""

    input: Decimal = Decimal(0)
    output: Decimal = Decimal(0)
    cached_input: Decimal | None = None
    images: dict[str, Decimal] | None = None
    characters: Decimal | None = None
    second: Decimal | None = None


def _price(input: str, output: str, cached_input: str | None = None) -> Price:
    return Price(Decimal(input), Decimal(output), Decimal(cached_input) if cached_input is not None else None)


def _per_image(**sizes: str) -> Price:
    """Per-image prices, keyed `size` or `quality/size` (written `quality__size` here)."""
    return Price(images={key.replace("__", "/").replace("_", "x"): Decimal(usd) for key, usd in sizes.items()})


# OpenAI's list prices (standard tier), USD per 1M tokens: input, output, cached input.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": _price("1.25", "10.00", "0.125"),
    "gpt-5-mini": _price("0.25", "2.00", "0.025"),
    "gpt-5-nano": _price("0.05", "0.40", "0.005"),
    "gpt-4.1": _price("2.00", "8.00", "0.50"),
    "gpt-4.1-mini": _price("0.40", "1.60", "0.10"),
    "gpt-4.1-nano": _price("0.10", "0.40", "0.025"),
    "gpt-4o": _price("2.50", "10.00", "1.25"),
    "gpt-4o-2024-05-13": _price("5.00", "15.00"),
    "gpt-4o-mini": _price("0.15", "0.60", "0.075"),
    "chatgpt-4o-latest": _price("5.00", "15.00"),
    "gpt-4-turbo": _price("10.00", "30.00"),
    "gpt-4": _price("30.00", "60.00"),
    "gpt-3.5-turbo": _price("0.50", "1.50"),
    "gpt-3.5-turbo-instruct": _price("1.50", "2.00"),
    "o1": _price("15.00", "60.00", "7.50"),
    "o1-mini": _price("1.10", "4.40", "0.55"),
    "o3": _price("2.00", "8.00", "0.50"),
    "o3-mini": _price("1.10", "4.40", "0.55"),
    "o4-mini": _price("1.10", "4.40", "0.275"),
    "text-embedding-3-small": _price("0.02", "0"),
    "text-embedding-3-large": _price("0.13", "0"),
    "text-embedding-ada-002": _price("0.10", "0"),
    # Moderations cost nothing at OpenAI; listed so that they count as priced (and a spent budget still
    # refuses them).
    "omni-moderation-latest": _price("0", "0"),
    "text-moderation-latest": _price("0", "0"),
    "text-moderation-stable": _price("0", "0"),
    # Images: USD per image. "*" is the dearest, for a size or quality not listed.
    "dall-e-2": _per_image(**{"256_256": "0.016", "512_512": "0.018", "1024_1024": "0.02", "*": "0.02"}),
    "dall-e-3": _per_image(
        **{
            "1024_1024": "0.04",
            "1024_1792": "0.08",
            "1792_1024": "0.08",
            "hd__1024_1024": "0.08",
            "hd__1024_1792": "0.12",
            "hd__1792_1024": "0.12",
            "*": "0.12",
        }
    ),
    "gpt-image-1": _per_image(
        **{
            "low__1024_1024": "0.011",
            "low__1024_1536": "0.016",
            "low__1536_1024": "0.016",
            "medium__1024_1024": "0.042",
            "medium__1024_1536": "0.063",
            "medium__1536_1024": "0.063",
            "high__1024_1024": "0.167",
            "*": "0.25",
        }
    ),
    # Speech: USD per 1M characters of input. Transcription: USD per second of audio.
    "tts-1": Price(characters=Decimal("15.00")),
    "tts-1-hd": Price(characters=Decimal("30.00")),
    "whisper-1": Price(second=Decimal("0.0001")),
    "gpt-4o-transcribe": Price(second=Decimal("0.0001")),
    "gpt-4o-mini-transcribe": Price(second=Decimal("0.00005")),
}
# Paths priced by what they make rather than by tokens, when the model's price has that unit.
IMAGE_PATHS = ("images/generations", "images/edits", "images/variations")
SPEECH_PATH = "audio/speech"
TRANSCRIPTION_PATHS = ("audio/transcriptions", "audio/translations")
# Before a transcription, its length is only known from the upload's size: this many bytes a second (16
# kbit/s, lower than most uploads) bounds it from above for a reservation.
AUDIO_BYTES_PER_SECOND = 2000
IMAGES_MAX = 10  # OpenAI's limit on `n` for images


def _decimal(value: float | int | None) -> Decimal | None:
    # The config's numbers come from YAML as floats: their shortest repr is the text that was written.
    return Decimal(str(value)) if value is not None else None


def _configured(name: str) -> Price | None:
    try:
        models = config_in_force().models
    except ConfigError:  # a broken file under a running server: the shipped prices still count
        return None
    model = models.get(name)
    if model is None:
        return None
    units = (model.price_image, model.price_characters, model.price_second)
    if model.price_input is None and all(unit is None for unit in units):
        return None
    return Price(
        _decimal(model.price_input or 0),
        _decimal(model.price_output or 0),
        _decimal(model.price_cached_input),
        {"*": _decimal(model.price_image)} if model.price_image is not None else None,
        _decimal(model.price_characters),
        _decimal(model.price_second),
    )


def price_known(model: str) -> Price | None:
    """The price of the model named `model` (a public name or an upstream's), or None if none is known."""
    if not model:
        return None
    found = _configured(model) or DEFAULT_PRICES.get(model) or DEFAULT_PRICES.get(_DATED.sub("", model))
    return found or _configured("*")


def price_default() -> Price:
    """DEFAULT_PRICE: what a model with no known price counts at, per 1M tokens."""
    parts = [Decimal(part.strip()) for part in settings.DEFAULT_PRICE.split(",")]
    return Price(parts[0], parts[-1])


def price_of(model: str) -> Price | None:
    """What a call to `model` is counted at: its known price, else DEFAULT_PRICE (None: no model)."""
    if not model:
        return None
    return price_known(model) or price_default()


class UnpricedModel(Exception):
    """A call to a model with no known price, under a budget, with UNPRICED_MODELS=refuse."""

    def __init__(self, model: str):
        self.model = model
        super().__init__(
            f"the model {model!r} has no price on this server, and a budget applies to you: "
            "the operator refuses unpriced models under a budget"
        )


def price_for_budget(model: str) -> Price | None:
    """The price a budget reserves `model`'s calls at; raises UnpricedModel when the model has none and
    UNPRICED_MODELS is `refuse`."""
    if not model:
        return None
    known = price_known(model)
    if known is None and settings.UNPRICED_MODELS == "refuse":
        raise UnpricedModel(model)
    return known or price_default()


def cost_of(price: Price | None, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> Decimal:
    """The cost at `price` of a call; `input_tokens` includes the `cached_tokens` (as OpenAI counts them)."""
    if price is None:
        return Decimal(0)
    cached = min(max(cached_tokens, 0), max(input_tokens, 0))
    cached_price = price.input if price.cached_input is None else price.cached_input
    total = (input_tokens - cached) * price.input + cached * cached_price + output_tokens * price.output
    return total / PER_TOKENS


def cost_usd(model: str, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> Decimal:
    """The cost in USD of a call to `model` (0 for a model with no known price)."""
    return cost_of(price_of(model), input_tokens, output_tokens, cached_tokens)


def _whole(value: object, default: int, most: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, most)
    return default


def units_cost(
    path: str, price: Price, fields: dict | None, *, body_size: int = 0, usage: object = None
) -> Decimal | None:
    """What a call on a path priced by what it makes costs at `price`: images (`n` of the asked `size`
    and `quality`), speech (the characters of `input`), transcription (the seconds the upstream's
    `usage` reports, else as many as `body_size` bytes of audio may hold). `fields`: the JSON body or
    the form's fields. None: the call is priced by its tokens (another path, or no such unit price)."""
    path = path.strip("/")
    fields = fields if isinstance(fields, dict) else {}
    if path in IMAGE_PATHS and price.images:
        size, quality = str(fields.get("size") or "*"), str(fields.get("quality") or "")
        each = price.images.get(f"{quality}/{size}") or price.images.get(size) or price.images.get("*")
        each = each if each is not None else max(price.images.values())
        return each * _whole(fields.get("n"), 1, IMAGES_MAX)
    if path == SPEECH_PATH and price.characters is not None:
        text = fields.get("input")
        return Decimal(len(text) if isinstance(text, str) else 0) * price.characters / PER_TOKENS
    if path in TRANSCRIPTION_PATHS and price.second is not None:
        seconds = usage.get("seconds") if isinstance(usage, dict) and usage.get("type") == "duration" else None
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
            seconds = -(-body_size // AUDIO_BYTES_PER_SECOND)
        return Decimal(str(seconds)) * price.second
    return None
