from django.apps import AppConfig


class ProxyConfig(AppConfig):
    name = "proxy"
    verbose_name = "Proxy and event log"

    def ready(self):
        from accounts.model_path import model_path_register
        from proxy.writer_bell import writer_bell_connect

        # accounts sits below proxy: what it needs of the model path is lent to it here.
        model_path_register(budget_set=_budget_set, models_offered=_models_offered)
        # The queues the event writer drains wake it through this bell (they sit below proxy.events).
        writer_bell_connect(_writer_wake)


# Each loads its module when first called, as the imports they replace did: a process that never
# sets a budget, lists models or queues a row does not load the gateway or the event log for it.


def _budget_set(**fields):
    from proxy.usage.budgets import budget_set

    return budget_set(**fields)


def _models_offered(allowed_models: frozenset[str] | None) -> list[str]:
    from proxy.upstreams import models_offered

    return models_offered(allowed_models)


def _writer_wake(*, soon: bool = False) -> None:
    from proxy.events import writer_wake

    writer_wake(soon=soon)
