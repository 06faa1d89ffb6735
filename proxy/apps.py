from django.apps import AppConfig


class ProxyConfig(AppConfig):
    name = "proxy"
    verbose_name = "Proxy and event log"

    def ready(self):
        # accounts sits below proxy: what it needs of the model path is lent to it here.
        from accounts.model_path import model_path_register
        from proxy.upstreams import models_offered
        from proxy.usage.budgets import budget_set

        model_path_register(budget_set=budget_set, models_offered=models_offered)
