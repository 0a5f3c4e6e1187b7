"""The event hub moved to :mod:`kensho.hub` (the kernel owns it, storage uses it too).

This name stays so ``from kensho.runtime.hub import EventHub`` keeps working.
"""

from __future__ import annotations

from kensho.hub import EventHub, Listener

__all__ = ["EventHub", "Listener"]
