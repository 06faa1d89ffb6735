"""Test helpers shared across the project (fake upstreams and the like)."""
