"""Helper threads: reading an iterator ahead with bounded memory (`read_ahead`), and running
work beside a block (`beside`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from queue import Full, Queue
from typing import Any, TypeVar

T = TypeVar("T")

_END = object()


def read_ahead(
    items: Iterable[T], depth: int = 2, name: str = "audience-sync-source"
) -> Generator[T, None, None]:
    """Iterate `items` in a helper thread, at most `depth` items ahead, so memory stays a few
    items (chunks of rows). An error in the helper is raised here; leaving early stops the
    helper after the item it is reading, which then closes the iterator (a source cursor)."""
    queue: Queue[Any] = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(item):
                    break
            else:
                put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    helper = threading.Thread(target=work, name=name, daemon=True)
    helper.start()
    try:
        while (item := queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        helper.join()


@contextmanager
def beside(tasks: Sequence[Callable[[], None]], name: str = "audience-sync-beside") -> Iterator[None]:
    """Run `tasks`, one after another, in a helper thread while the block runs; wait for them
    when it ends (however it ends). An error of a task is raised then, unless the block raised
    its own."""
    if not tasks:
        yield
        return
    errors: list[BaseException] = []

    def work() -> None:
        for task in tasks:
            try:
                task()
            except Exception as exc:  # raised in the caller's thread, after the block
                errors.append(exc)

    helper = threading.Thread(target=work, name=name, daemon=True)
    helper.start()
    try:
        yield
    finally:
        helper.join()
    if errors:
        raise errors[0]
