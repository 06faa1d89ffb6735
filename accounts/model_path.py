"""What accounts asks of the model path above it: a key's budget and the models a key form offers.

Both are proxy's (budgets in proxy.usage, the served models in proxy.upstreams), and accounts sits below
proxy: proxy lends them here when its app is ready (proxy.apps), so accounts imports no app above it.
The one other call up from accounts, signup's first group, is named where it is made (accounts.services).
"""

from collections.abc import Callable
from decimal import Decimal

_budget_set: Callable | None = None
_models_offered: Callable[[frozenset[str] | None], list[str]] | None = None


def model_path_register(*, budget_set: Callable, models_offered: Callable[[frozenset[str] | None], list[str]]) -> None:
    """Lend accounts proxy's `budget_set(scope=, target_id=, usd=, period=)` and `models_offered(allowed)`."""
    global _budget_set, _models_offered
    _budget_set, _models_offered = budget_set, models_offered


def key_budget_set(*, key_id, usd: Decimal, period: str) -> None:
    """Give an API key a budget of its own (in the caller's transaction, as proxy.usage.budgets sets it)."""
    _budget_set(scope="key", target_id=key_id, usd=usd, period=period)


def models_offered(allowed_models: frozenset[str] | None) -> list[str]:
    """The public model names to offer a user limited to `allowed_models` (None: any), the default first."""
    return _models_offered(allowed_models)
