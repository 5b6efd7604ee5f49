"""Signed model updates: A/B slots, states, self-test, trial, rollback (docs/updates.md)."""
