import uuid

from django.conf import settings
from django.db import IntegrityError, models, transaction

# Attempts at a free per-owner conversation number when two chats of one owner are created at once.
NUMBER_ATTEMPTS = 5


class Chat(models.Model):
    """A 1:1 or group conversation with a model."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    model = models.CharField(max_length=100)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="owned_chats")
    group = models.ForeignKey("groups.Group", on_delete=models.SET_NULL, null=True, blank=True, related_name="chats")
    system_prompt = models.TextField(blank=True, default="")
    # Names of registered tools the model may call in this chat.
    tools = models.JSONField(default=list, blank=True)
    # Model settings sent with every prompt (chats.options): temperature, max_tokens, ...
    settings = models.JSONField(default=dict, blank=True)
    # The response_format of a prompt that gives none (proxy.structured): null for plain text replies.
    response_format = models.JSONField(null=True, blank=True, default=None)
    # The chat program (chats.programs) this chat runs, by its registered name; blank: an ordinary chat.
    program = models.CharField(max_length=100, blank=True, default="", editable=False)
    # A conversation's own upstream key (the conversation API's api_key), encrypted; never returned in full.
    api_key_encrypted = models.TextField(blank=True, default="", editable=False)
    # The conversation API's conversation_id: 1, 2, 3... per owner, given on creation (our own API uses the UUID).
    number = models.PositiveIntegerField(editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    # Bumped by every prompt: /chat/index sorts by latest activity.
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    class Meta:
        db_table = "chats"
        constraints = [models.UniqueConstraint(fields=["owner", "number"], name="chats_owner_number_unique")]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs):
        if not (self._state.adding and self.number is None):
            return super().save(*args, **kwargs)
        # The owner's next number. The owner's row is locked first (Postgres, MySQL: until the enclosing
        # transaction ends), so one owner's creations take their numbers one at a time; a collision
        # the lock cannot prevent (SQLite has none) makes the insert fail: take the next.
        owner_model = self._meta.get_field("owner").related_model
        for attempt in range(NUMBER_ATTEMPTS):
            try:
                with transaction.atomic():
                    list(owner_model.objects.select_for_update().filter(pk=self.owner_id).values_list("pk"))
                    latest = Chat.objects.filter(owner_id=self.owner_id).aggregate(models.Max("number"))
                    self.number = (latest["number__max"] or 0) + 1
                    return super().save(*args, **kwargs)
            except IntegrityError:
                if attempt == NUMBER_ATTEMPTS - 1:
                    raise
                self.number = None


class ChatMember(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    chat = models.ForeignKey(Chat, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_memberships")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "chat_members"
        constraints = [models.UniqueConstraint(fields=["chat", "user"], name="chat_members_unique")]
        indexes = [models.Index(fields=["user", "chat"], name="chat_members_user_idx")]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.chat_id}"


class Message(models.Model):
    """One prompt/reply exchange in a chat."""

    class Status(models.TextChoices):
        STREAMING = "streaming"
        COMPLETE = "complete"
        ERROR = "error"
        # The model called a function of the client's: the turn waits for the client's tool results.
        TOOL_CALLS = "tool_calls"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    chat = models.ForeignKey(Chat, on_delete=models.CASCADE, related_name="messages")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="messages")
    prompt = models.TextField()
    reply = models.TextField(blank=True, default="")
    model = models.CharField(max_length=100, blank=True, default="")
    # Off the record: stored and shown to members, never sent to the model nor used as context.
    is_otr = models.BooleanField(default=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    error = models.TextField(blank=True, default="")
    tool_calls = models.JSONField(default=list, blank=True)
    # The reply parsed as JSON and valid against the prompt's response_format schema (proxy.structured).
    data = models.JSONField(null=True, blank=True, default=None)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    total_tokens = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "messages"
        indexes = [models.Index(fields=["chat", "created_at"], name="messages_chat_time_idx")]

    def __str__(self) -> str:
        return f"{self.id} in {self.chat_id}"


class ChatProgram(models.Model):
    """The state of a chat's program: its recorded steps, its memory and where it waits.

    A turn re-runs the program over `steps` (the inputs it was given and the replies it generated, in
    order), so any process can resume it after a restart without asking the model again.
    """

    class Status(models.TextChoices):
        RUNNING = "running"  # a turn is in progress (until lease_until, in case its process died)
        WAITING = "waiting"  # asked for input: the next prompt resumes it
        FINISHED = "finished"

    chat = models.OneToOneField(Chat, on_delete=models.CASCADE, primary_key=True, related_name="program_state")
    name = models.CharField(max_length=100)
    context = models.JSONField(default=dict, blank=True)
    steps = models.JSONField(default=list, blank=True)
    # The program's memory (the messages the model sees) as of `memory_steps` recorded steps.
    memory = models.JSONField(default=list, blank=True)
    memory_steps = models.IntegerField(default=-1)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    asking = models.TextField(blank=True, default="")  # the message of the GetUserInput it waits on
    lease_until = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "chat_programs"

    def __str__(self) -> str:
        return f"{self.name} in {self.chat_id}"
