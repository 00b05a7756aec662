"""What napari notified while a widget action ran (GUI tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def notifications(action: Callable[[], Any]) -> list[str]:
    """Run ``action`` and return the messages of the napari notifications it raised."""
    from napari.utils.notifications import notification_manager

    seen: list[Any] = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        action()
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    return [n.message for n in seen]
