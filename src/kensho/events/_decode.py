"""The one typed decoder of the status stream: ``event: kind`` + ``data`` to an event.

Every reader (``kensho status``, the tests) decodes through the same dataclasses the
server encodes with, so a renamed field is a decoding error that names the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from kensho.events import release, runtime, server, storage
from kensho.events._base import Event

__all__ = ["UnknownEvent", "decode_event", "event_types"]

# The modules that hold the vocabulary: a new one is added here.
_VOCABULARY: tuple[ModuleType, ...] = (storage, runtime, server, release)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownEvent(Event):
    """An event of a kind this version does not know (a newer server): shown as text."""

    kind: ClassVar[str] = "unknown"
    name: str
    text: str

    @property
    def message(self) -> str:
        return self.text


def event_types() -> dict[str, type[Event]]:
    """Every event class of this vocabulary by its ``kind``.

    Read from the vocabulary modules' names rather than ``__subclasses__()``: a
    slotted dataclass is a copy of the class it decorates, and the original lingers
    there.
    """
    return {
        obj.kind: obj
        for module in _VOCABULARY
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Event) and obj is not Event
    }


_ADAPTERS: dict[type[Event], Any] = {}


def decode_event(kind: str, data: Mapping[str, Any]) -> Event:
    """The event a status-stream ``event: kind`` / ``data: …`` pair encodes.

    Fields are validated against the event's dataclass (types included); a missing or
    mistyped field raises :class:`ValueError` naming the kind and the field. A kind
    this version does not know becomes an :class:`UnknownEvent` with its message.
    """
    from pydantic import TypeAdapter, ValidationError  # only readers of the stream need it

    cls = event_types().get(kind)
    if cls is None:
        return UnknownEvent(name=kind, text=str(data.get("message", "")))
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    try:
        event: Event = adapter.validate_python(dict(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "data"
        raise ValueError(f"status event {kind!r}: {where}: {first['msg']}") from None
    return event
