"""Wait on a condition with a timeout instead of sleeping (the one definition lives in demo/loop.py,
which the demo and the tests share; it imports nothing but the standard library)."""

from __future__ import annotations

from demo.loop import wait_for

__all__ = ["wait_for"]
