"""What model calls cost and who may make them: usage, pricing, budgets and rate limits.

Every path that reaches a model (/v1, chat prompts and their tool rounds, /ws, ai.*) identifies its
`Caller` (caller.py): the user, the group the call counts against, and the API key.
"""
