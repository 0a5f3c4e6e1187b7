"""The base of every status event (the vocabulary lives beside it in this package).

Events are data: frozen dataclasses with a ``kind`` and a JSON-serialisable
``to_dict()``. Components yield them; the CLI renders them as progress bars or
tables, the logger writes them as JSON lines, the HTTP server streams them as
server-sent events. No component formats user text for another, except the one-line
``message`` every event carries for humans.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Event"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every status event; ``ts`` is a wall-clock UNIX timestamp.

    ``log_level`` is the level the hub's log listener writes the event at
    (``kensho.hub.log_event``); ``None``: the event is not logged by the hub (its
    source logs it, or it is progress that would flood the log). ``log_service`` is
    the service the line is logged under, so per-service levels apply to it as to
    the component's own lines. ``log_name``, when set, is the line's event name
    instead of :attr:`message`: a fixed name (``"file repaired"``) that log queries
    and alerts can match, where the message varies with the fields.
    """

    kind: ClassVar[str] = "event"
    log_level: ClassVar[str | None] = None
    log_service: ClassVar[str] = "events"
    log_name: ClassVar[str | None] = None
    ts: float = field(default_factory=time.time)

    @property
    def message(self) -> str:
        """A one-line human summary; subclasses override it."""
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        """The event as plain JSON-ready data: ``kind``, ``message`` and every field."""
        data: dict[str, Any] = {"kind": self.kind, "message": self.message}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data
