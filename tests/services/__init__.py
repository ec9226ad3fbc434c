"""Real services started by the tests on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedService(Generic[T]):
    """One running instance of a service per test session.

    A session fixture imported into several test modules (or registered as a plugin as well)
    becomes several fixture definitions; through :meth:`use` they share one instance, started
    by the first user and stopped when the last one is done.
    """

    def __init__(self, start: Callable[[], T], stop: Callable[[T], None]) -> None:
        self._start, self._stop = start, stop
        self._value: T | None = None
        self._users = 0

    @contextlib.contextmanager
    def use(self) -> Iterator[T]:
        """The shared instance, started on first use."""
        if self._users == 0:
            self._value = self._start()
        self._users += 1
        try:
            yield self._value  # type: ignore[misc]
        finally:
            self._users -= 1
            if self._users == 0:
                value, self._value = self._value, None
                self._stop(value)  # type: ignore[arg-type]
