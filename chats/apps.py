from django.apps import AppConfig


class ChatsConfig(AppConfig):
    name = "chats"
    verbose_name = "Chats"

    def ready(self):
        from chats import services
        from groups.signals import group_members_removed

        def on_group_members_removed(sender, group_id, user_ids, **kwargs):
            services.group_access_changed(group_id=group_id, user_ids=user_ids)

        group_members_removed.connect(on_group_members_removed, dispatch_uid="chats.group_members_removed")
