"""What a model call costs, in USD, exactly: `Decimal` prices per 1M tokens, never floats.

A model's `price:` in TURBO_CONFIG (`input`, `output`, optional `cached_input`) wins; otherwise the
shipped table below for common OpenAI models (a dated name such as `gpt-4o-mini-2024-07-18` is priced
as `gpt-4o-mini`); otherwise a `price:` on the config's `"*"` model. A model with no price costs 0.
"""

import re
from dataclasses import dataclass
from decimal import Decimal

PER_TOKENS = Decimal(1_000_000)
_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens. `cached_input` None: cached input tokens cost as input."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None


def _price(input: str, output: str, cached_input: str | None = None) -> Price:
    return Price(Decimal(input), Decimal(output), Decimal(cached_input) if cached_input is not None else None)


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
}


def _decimal(value: float | int | None) -> Decimal | None:
    # The config's numbers come from YAML as floats: their shortest repr is the text that was written.
    return Decimal(str(value)) if value is not None else None


def _configured(name: str) -> Price | None:
    from proxy.gateway import GatewayError, gateway_config  # here: the gateway imports usage

    try:
        models = gateway_config().models
    except GatewayError:  # a broken file under a running server: the shipped prices still count
        return None
    model = models.get(name)
    if model is None or model.price_input is None:
        return None
    return Price(_decimal(model.price_input), _decimal(model.price_output or 0), _decimal(model.price_cached_input))


def price_of(model: str) -> Price | None:
    """The price of the model named `model` (a public name or an upstream's), or None if none is known."""
    if not model:
        return None
    found = _configured(model) or DEFAULT_PRICES.get(model) or DEFAULT_PRICES.get(_DATED.sub("", model))
    return found or _configured("*")


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
