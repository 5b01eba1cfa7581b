"""The registry of primitives and the single-source check (DESIGN.md, contract 4)."""
from __future__ import annotations

import fnmatch
from typing import Dict, List, Optional, Sequence, Tuple

from memstate.fingerprint import StateFingerprint
from memstate.perturb._core import Applied, Primitive, SingleSourceViolation, TrainState, UnknownPrimitiveError


_REGISTRY: Dict[str, Primitive] = {}


def names() -> Tuple[str, ...]:
    """Names of the registered primitives, in registration order (null, then S1..S5)."""
    return tuple(_REGISTRY)


def get(name: str) -> Primitive:
    """The registered primitive ``name``; UnknownPrimitiveError listing the valid names otherwise."""
    if isinstance(name, Primitive):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownPrimitiveError(
            f"unknown perturbation primitive {name!r}; valid: {', '.join(_REGISTRY)}") from None


def register(primitive: Primitive, *, replace: bool = False) -> Primitive:
    """Adds a primitive to the registry (ValueError if the name is taken, unless ``replace``)."""
    if not isinstance(primitive, Primitive):
        raise TypeError(f"register() takes a Primitive, got {type(primitive).__name__}")
    if primitive.name in _REGISTRY and not replace:
        raise ValueError(f"a primitive named {primitive.name!r} is already registered (pass replace=True)")
    _REGISTRY[primitive.name] = primitive
    return primitive


def unregister(name: str) -> None:
    """Removes a registered primitive (UnknownPrimitiveError if there is none of that name)."""
    get(name)
    del _REGISTRY[name]


# ----------------------------------------------------------------------------------- single source
def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def check_single_source(before: StateFingerprint, after: StateFingerprint, touches: Sequence[str], *,
                        name: str = "perturbation") -> List[str]:
    """Names of the entries that differ between ``before`` and ``after`` (fingerprint, dtype,
    shape, or present on one side only). Raises ``SingleSourceViolation`` naming those that match
    none of the ``touches`` patterns; with no patterns, any difference is a violation."""
    changed = before.diff(after)
    undeclared = [n for n in changed if not _matches(n, touches)]
    if undeclared:
        shown = ", ".join(undeclared[:20]) + (f", ... ({len(undeclared)} in all)" if len(undeclared) > 20 else "")
        raise SingleSourceViolation(
            f"{name} changed state it does not declare: {shown} (declared: {list(touches) or 'nothing'}); "
            f"the state has been modified", undeclared, changed)
    return changed


def apply_checked(name, state: TrainState, *, window: Optional[int] = None, **params) -> Applied:
    """Applies primitive ``name`` (or a Primitive) to ``state`` and proves it single-source.

    Fingerprints the state, applies, fingerprints again; every entry that changed must match a
    pattern the primitive declares for these parameters (``SingleSourceViolation`` naming the
    others if not), and ``null`` must leave the digest identical. The returned ``Applied`` lists
    the changed entries and both digests. Preconditions are checked before the first
    fingerprint, so a primitive that does not apply raises PerturbationError with no change.
    """
    prim = get(name)
    prim.check(state, **params)
    before = state.fingerprint()
    applied = prim.apply(state, window=window, **params)
    after = state.fingerprint()
    changed = check_single_source(before, after, applied.touches, name=prim.name)
    if prim.source == "none" and before.digest != after.digest:
        raise SingleSourceViolation(
            f"{prim.name} changed the state digest ({before.digest} -> {after.digest})", changed, changed)
    applied.changed = changed
    applied.digest_before, applied.digest_after = before.digest, after.digest
    return applied
