"""Progress bars on long work, with one rule for every public function.

``progress=None`` (the default) shows a bar only once its loop has run for
:data:`DELAY_S` seconds, so quick calls stay silent and long ones report;
``True`` shows it at once, ``False`` never.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

#: Seconds a loop runs before its bar appears under ``progress=None``.
DELAY_S = 2.0

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], *, progress: bool | None, desc: str, **kwargs: Any) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar that follows the ``progress`` rule above."""
    return tqdm(iterable, desc=desc, **_rule(progress), **kwargs)


def progress_counter(total: int, *, progress: bool | None, desc: str, **kwargs: Any) -> tqdm:
    """A tqdm bar of ``total`` units advanced by hand (``bar.update(k)``), same rule; close it when done."""
    return tqdm(total=total, desc=desc, **_rule(progress), **kwargs)


def _rule(progress: bool | None) -> dict[str, Any]:
    """The rule above as tqdm options."""
    return {"disable": progress is False, "delay": 0.0 if progress else DELAY_S}
