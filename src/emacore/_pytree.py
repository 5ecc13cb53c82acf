"""Flatten and rebuild nested containers of arrays, with leaf names by key path.

A tree is a leaf (anything that is not a container), ``None`` (no leaves), a ``dict``,
``list``, ``tuple`` or namedtuple of trees, or a framework's own container type (a JAX
registered pytree node such as a flax struct), which a backend splits into named
children through ``Backend.flatten_node`` (asked once per type).

``flatten`` returns the leaves and a hashable *treedef*; names are derived from the treedef
once and cached, so a training loop that passes the same structure every step pays for a
tuple comparison, not for string building. Dict keys are ordered by their string form when
they are all strings (as JAX does), so two dicts with the same keys have the same structure
whatever their insertion order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from emacore.backend import ShadowList

__all__ = [
    "LEAF",
    "ShadowList",
    "ShadowTree",
    "flatten",
    "is_flat_sequence",
    "leaf_names",
    "unflatten",
]

LEAF = "*"
_NONE = ("none",)


class ShadowTree:
    """Shadows of a nested structure, kept whole as the backend laid them out.

    `emacore.functional.init` gives this as ``state.shadow`` when asked for a packed
    ``layout`` of a dict (or any nested structure) on a backend whose packed shadows cannot be
    read leaf by leaf without copying (jax): updates then run on the packed buffers. It is a
    pytree for jax (its buffers are the children). `tree` gives the structure with one array
    per leaf; `emacore.functional.average` the averages.
    """

    __slots__ = ("shadows", "treedef")

    def __init__(self, shadows: ShadowList, treedef: Any) -> None:
        self.shadows = shadows
        self.treedef = treedef

    def tree(self) -> Any:
        """The shadows in the parameters' structure, one array per leaf."""
        return _build(self.treedef, iter(self.shadows))

    def __repr__(self) -> str:
        return f"ShadowTree({self.tree()!r})"


def _resolve_node(x: Any) -> tuple[tuple[str, ...], list[Any], Any] | None:
    from emacore import _plugins  # lazily: the registry loads backends

    return _plugins.get_registry().flatten_node(x)


# obj -> (child keys, children, a hashable rebuilder with ``.unflatten(children)``) for a
# framework's container type, or None for a leaf. Asked once per type for types that are not
# built-in containers (tests may replace it).
node_resolver: Callable[[Any], tuple[tuple[str, ...], list[Any], Any] | None] | None = _resolve_node
_FOREIGN: dict[type, bool] = {}  # type -> is it a framework container?


def _is_namedtuple(t: type) -> bool:
    return issubclass(t, tuple) and hasattr(t, "_fields")


def _is_foreign_node(x: Any) -> bool:
    t = type(x)
    known = _FOREIGN.get(t)
    if known is None:
        known = _FOREIGN[t] = node_resolver is not None and node_resolver(x) is not None
    return known


def _is_builtin_container(t: type) -> bool:
    return t is type(None) or issubclass(t, (dict, list, tuple))


def _is_container_type(t: type) -> bool:
    return _is_builtin_container(t) or bool(_FOREIGN.get(t))


def _leaves_only(items: Any) -> bool:
    """True if no item is a container (asking once per new type whether it is one)."""
    distinct = set(map(type, items))
    if not all(t in _FOREIGN or _is_builtin_container(t) for t in distinct):
        for x in items:  # first sight of a type: ask once whether it is a framework container
            if type(x) not in _FOREIGN and not _is_builtin_container(type(x)):
                _is_foreign_node(x)
    return not any(_is_container_type(t) for t in distinct)


def is_flat_sequence(tree: Any) -> bool:
    """True for a plain list or tuple (not a namedtuple) whose items are all leaves."""
    if isinstance(tree, ShadowList):
        return True  # a backend made it: its items are arrays (reading them may cost)
    if type(tree) not in (list, tuple):
        return False
    return _leaves_only(tree)


def flatten(tree: Any) -> tuple[list[Any], Any]:
    """Return ``(leaves, treedef)``.

    Examples
    --------
    >>> leaves, treedef = flatten({"b": 2.0, "a": [1.0, None]})
    >>> leaves
    [1.0, 2.0]
    >>> leaf_names(treedef)
    ('a/0', 'b')
    """
    if isinstance(tree, ShadowTree):
        return tree.shadows, tree.treedef
    if is_flat_sequence(tree):
        kind = "tuple" if type(tree) is tuple else "list"
        return (tree if isinstance(tree, ShadowList) else list(tree)), (kind, (LEAF,) * len(tree))
    leaves: list[Any] = []
    return leaves, _flatten_into(tree, leaves)


def _sorted_keys(d: dict[Any, Any]) -> tuple[Any, ...]:
    keys = tuple(d)
    if set(map(type, keys)) <= {str}:
        return tuple(sorted(keys))
    return keys


def _flatten_into(tree: Any, leaves: list[Any]) -> Any:
    t = type(tree)
    if tree is None:
        return _NONE
    if issubclass(t, dict):
        keys = _sorted_keys(tree)
        values = list(map(tree.__getitem__, keys))
        if _leaves_only(values):  # the common innermost dict: no recursion per leaf
            leaves.extend(values)
            return ("dict", t, keys, (LEAF,) * len(keys))
        return ("dict", t, keys, tuple(_flatten_into(v, leaves) for v in values))
    if issubclass(t, tuple) and _is_namedtuple(t):
        return ("namedtuple", t, tuple(_flatten_into(v, leaves) for v in tree))
    if issubclass(t, (list, tuple)):
        kind = "list" if issubclass(t, list) else "tuple"
        return (kind, tuple(_flatten_into(v, leaves) for v in tree))
    if _is_foreign_node(tree):
        assert node_resolver is not None
        node = node_resolver(tree)
        if node is not None:
            keys, children, rebuild = node
            return ("node", rebuild, keys, tuple(_flatten_into(c, leaves) for c in children))
    leaves.append(tree)
    return LEAF


def unflatten(treedef: Any, leaves: list[Any]) -> Any:
    """Rebuild the container described by ``treedef`` from ``leaves`` (inverse of flatten).

    A `ShadowList` the backend made comes back as it is for a flat list, and as a
    `ShadowTree` for any other structure when its items are not views (``views``).
    """
    if isinstance(leaves, ShadowList):
        if treedef == ("list", (LEAF,) * len(leaves)):
            return leaves
        if not leaves.views:
            return ShadowTree(leaves, treedef)
    it = iter(leaves)
    return _build(treedef, it)


def _build(treedef: Any, it: Any) -> Any:
    if treedef == LEAF:
        return next(it)
    kind = treedef[0]
    if kind == "none":
        return None
    if kind == "dict":
        _, t, keys, children = treedef
        if children.count(LEAF) == len(children):  # the common innermost dict, at C speed
            built = dict(zip(keys, itertools.islice(it, len(keys))))
        else:
            built = {k: _build(c, it) for k, c in zip(keys, children)}
        return built if t is dict else t(built)
    if kind == "namedtuple":
        _, t, children = treedef
        return t(*(_build(c, it) for c in children))
    if kind == "node":
        _, rebuild, _, children = treedef
        return rebuild.unflatten([_build(c, it) for c in children])
    children = treedef[1]
    if kind == "list" and children.count(LEAF) == len(children):
        return list(itertools.islice(it, len(children)))
    items = [_build(c, it) for c in children]
    return items if kind == "list" else tuple(items)


_NAMES: dict[Any, tuple[str, ...]] = {}
_NAMES_MAX = 256


def leaf_names(treedef: Any) -> tuple[str, ...]:
    """Return each leaf's key path, joined with ``/`` (``""`` for a bare leaf).

    Cached per treedef in a plain dict (not ``functools.lru_cache``, which
    ``torch.compile`` warns about when it traces through it).
    """
    names = _NAMES.get(treedef)
    if names is None:
        out: list[str] = []
        _names_into(treedef, "", out)
        names = tuple(out)
        if len(_NAMES) >= _NAMES_MAX:
            _NAMES.clear()
        _NAMES[treedef] = names
    return names


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}/{key}" if prefix else str(key)


def _names_into(treedef: Any, prefix: str, out: list[str]) -> None:
    if treedef == LEAF:
        out.append(prefix)
        return
    kind = treedef[0]
    if kind == "none":
        return
    if kind in ("dict", "node"):
        for k, c in zip(treedef[2], treedef[3]):
            _names_into(c, _join(prefix, k), out)
    elif kind == "namedtuple":
        for field, c in zip(treedef[1]._fields, treedef[2]):
            _names_into(c, _join(prefix, field), out)
    else:
        for i, c in enumerate(treedef[1]):
            _names_into(c, _join(prefix, i), out)
