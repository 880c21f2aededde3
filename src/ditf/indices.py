"""Index lists as people type them on a command line: '5-20', '3,7,9-11', '4-22:2', '-1'; and back."""

from __future__ import annotations

from collections.abc import Iterable

from ditf.errors import InvalidArgumentError


def parse_indices(text: str, name: str, *, negative: bool = True) -> list[int]:
    """'5-20' | '3,7,9-11' | '4-22:2' | '-1' -> the indices in the order given (ranges inclusive, ':STEP'
    optional). With `negative`, a lone negative index is kept (callers count it from the end); errors name
    `name` and show the accepted forms."""
    values: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        span, _, step = part.partition(":")
        dash = span.find("-", 1)
        try:
            start = int(span if dash < 0 else span[:dash])
            stop = start if dash < 0 else int(span[dash + 1:])
            stride = int(step) if step else 1
        except ValueError as err:
            raise InvalidArgumentError(f"{name}={text!r}: {part!r} is not an index or a range; use e.g. '5-20', "
                                       "'3,7,9-11' or '4-22:2'.") from err
        if stop < start or stride < 1 or (start < 0 and (dash >= 0 or not negative)):
            raise InvalidArgumentError(f"{name}={text!r}: {part!r} is not a range of indices (FIRST-LAST or "
                                       "FIRST-LAST:STEP, with 0 <= FIRST <= LAST and STEP >= 1).")
        values.extend(range(start, stop + 1, stride))
    if not values:
        raise InvalidArgumentError(f"{name}={text!r} lists no index; give e.g. '5-20' or '3,7'.")
    return values


def format_indices(values: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (sorted, distinct, inclusive ranges)."""
    ordered = sorted(set(int(v) for v in values))
    parts: list[str] = []
    start = previous = None
    for value in ordered + [None]:
        if start is not None and (value is None or value != previous + 1):
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if value is not None and start is None:
            start = value
        previous = value
    return ",".join(parts)
