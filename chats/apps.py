from django.apps import AppConfig


class ChatsConfig(AppConfig):
    name = "chats"
    verbose_name = "Chats"

    def ready(self):
        from chats import receivers  # noqa: F401  (connects the module-level receivers)
        from chats.programs.registry import programs

        programs()  # a CHAT_PROGRAMS entry that cannot be loaded stops the start, saying which
