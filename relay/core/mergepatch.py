"""JSON Merge Patch (RFC 7386): the patch from one value to the next, and its application.

State channels with ``delta = true`` send a subscriber the patch from the value it holds
to the new one instead of the new value. A merge patch is a JSON value: an object patches
an object member by member (``null`` removes a member, a nested object patches that
member), anything else replaces the target whole (arrays too).

Two limits follow from the format and :func:`diff` respects both, answering
:data:`NO_PATCH` when the new value cannot be reached by any patch:

- ``null`` means "remove", so a new value with a ``null`` member somewhere inside its
  objects (outside arrays) cannot be written into an object by a patch;
- arrays are replaced whole (a patch holds the whole new array).

Equality is JSON equality: ``1``, ``1.0`` and ``true`` differ, as they do on the wire.
Pure functions; no I/O, nothing here mutates its arguments.
"""

from __future__ import annotations

import math
from typing import Any, Final


class _NoPatch:
    """The type of :data:`NO_PATCH`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_PATCH"


#: What :func:`diff` returns when no merge patch turns the old value into the new one.
NO_PATCH: Final = _NoPatch()


def same(a: Any, b: Any) -> bool:
    """Return whether ``a`` and ``b`` are the same JSON value (``1``, ``1.0``, ``true`` differ)."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        if len(a) != len(b):
            return False
        for key, x in a.items():
            if key not in b:
                return False
            y = b[key]
            sub = type(x)
            # (leaves inline: this runs for every unchanged member of every publication)
            if sub is not type(y):
                return False
            if sub is dict or sub is list:
                if not same(x, y):
                    return False
            elif x != y or (sub is float and math.copysign(1.0, x) != math.copysign(1.0, y)):
                return False
        return True
    if kind is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if kind is float:
        return bool(a == b and math.copysign(1.0, a) == math.copysign(1.0, b))
    return bool(a == b)


def _null_free(value: Any) -> bool:
    """Whether ``value`` survives being merged into ``{}`` unchanged: no ``null`` member in
    its objects (arrays are taken whole, so what is inside them does not matter)."""
    if isinstance(value, dict):
        return all(v is not None and _null_free(v) for v in value.values())
    return True


def diff(old: Any, new: Any) -> Any:
    """Return the merge patch that turns ``old`` into ``new``, or :data:`NO_PATCH`.

    The patch is minimal member by member: unchanged members are left out, a removed
    member is ``null``, a changed object member is patched recursively, anything else
    changed is replaced. Equal values give ``{}`` when they are objects.

    Returns:
        The patch (a JSON value sharing parts of ``new``; do not mutate it), or
        :data:`NO_PATCH` when ``new`` has a ``null`` member in an object that the patch
        would have to write (RFC 7386 reads it as "remove").
    """
    if not isinstance(new, dict):
        return new  # replaces the target whole (null included: the result is null)
    if not isinstance(old, dict):
        return new if _null_free(new) else NO_PATCH
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        if key in old:
            before = old[key]
            if same(before, value):
                continue
            if value is None:
                return NO_PATCH  # a member whose new value is null cannot be written
            sub = diff(before, value)
            if sub is NO_PATCH:
                return NO_PATCH
            patch[key] = sub
        else:
            if value is None or not _null_free(value):
                return NO_PATCH
            patch[key] = value
    return patch


def apply(target: Any, patch: Any) -> Any:
    """Return ``target`` patched by ``patch`` (RFC 7386, section 2), leaving both untouched.

    The result shares the parts of ``target`` and ``patch`` the patch does not change.
    """
    if not isinstance(patch, dict):
        return patch
    result: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply(result.get(key), value)
    return result


def copy(value: Any) -> Any:
    """Return a deep copy of the JSON value ``value`` (objects and arrays are new)."""
    if isinstance(value, dict):
        return {k: copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy(v) for v in value]
    return value
