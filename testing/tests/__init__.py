"""Self-tests for the test helpers."""
