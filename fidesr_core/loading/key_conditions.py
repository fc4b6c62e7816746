"""Small tests on a single-file checkpoint's key names, shapes, top-level keys and metadata.

The rule table in ``file_rules`` is written in these.  Each condition answers
``evidence(checkpoint)``: ``None`` when it does not hold, otherwise the phrases
saying why it holds (for messages such as "an SD 1.x checkpoint (text context
768, conv proj_in)"); a condition given ``reason=""`` holds silently.  They
read only what ``open_checkpoint`` already knows (names, shapes, metadata),
never tensor data.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable

from .checkpoint_files import OpenedCheckpoint

__all__ = [
    "Evidence",
    "KeyCondition",
    "HasKey",
    "HasKeyContaining",
    "HasKeyStartingWith",
    "HasKeyMatching",
    "TopLevelKey",
    "TopLevelKeyEndingWith",
    "MetadataIs",
    "MetadataContains",
    "FileNameContains",
    "KeyShape",
    "KeyRank",
    "KeyCount",
    "NoTensors",
    "AllOf",
    "AnyOf",
    "Not",
]

Evidence = tuple[str, ...]
_MAX_NAMES = 3  # key names quoted as evidence


def _names(found: Iterable[str]) -> str:
    names = sorted(found)
    return ", ".join(names[:_MAX_NAMES]) + (", ..." if len(names) > _MAX_NAMES else "")


def _said(reason: str | None, default: str) -> Evidence:
    text = default if reason is None else reason
    return (text,) if text else ()


class KeyCondition(ABC):
    """A test on an opened checkpoint."""

    @abstractmethod
    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        """Why the condition holds (possibly nothing to say), or None when it does not."""

    def holds(self, checkpoint: OpenedCheckpoint) -> bool:
        return self.evidence(checkpoint) is not None

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class HasKey(KeyCondition):
    """One of ``keys`` is a tensor name."""

    def __init__(self, *keys: str, reason: str | None = None) -> None:
        self.keys, self.reason = keys, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        found = [key for key in self.keys if key in checkpoint.shapes]
        return _said(self.reason, _names(found)) if found else None


class HasKeyContaining(KeyCondition):
    """A tensor name contains one of ``fragments``."""

    def __init__(self, *fragments: str, reason: str | None = None) -> None:
        self.fragments, self.reason = fragments, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        found = {fragment for fragment in self.fragments if any(fragment in key for key in checkpoint.shapes)}
        return _said(self.reason, _names(found)) if found else None


class HasKeyStartingWith(KeyCondition):
    """A tensor name starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str, reason: str | None = None) -> None:
        self.prefixes, self.reason = prefixes, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        found = {prefix for prefix in self.prefixes if any(key.startswith(prefix) for key in checkpoint.shapes)}
        return _said(self.reason, _names(prefix + "*" for prefix in found)) if found else None


class HasKeyMatching(KeyCondition):
    """A tensor name matches the regular expression ``pattern`` somewhere (``re.search``)."""

    def __init__(self, pattern: str, *, reason: str | None = None) -> None:
        self.pattern, self.reason = re.compile(pattern), reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        found = next((key for key in checkpoint.shapes if self.pattern.search(key)), None)
        return _said(self.reason, found) if found is not None else None


class TopLevelKey(KeyCondition):
    """One of ``names`` is a key of the pickled dict's top level (training outputs keep lists and ranks there)."""

    def __init__(self, *names: str, reason: str | None = None) -> None:
        self.names, self.reason = names, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        found = set(self.names) & checkpoint.top_keys
        return _said(self.reason, _names(found)) if found else None


class TopLevelKeyEndingWith(KeyCondition):
    """A top-level key ends with one of ``suffixes``."""

    def __init__(self, *suffixes: str, reason: str | None = None) -> None:
        self.suffixes, self.reason = suffixes, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        found = [key for key in checkpoint.top_keys if key.endswith(self.suffixes)]
        return _said(self.reason, _names(found)) if found else None


class MetadataIs(KeyCondition):
    """The safetensors metadata has ``key`` = ``value``."""

    def __init__(self, key: str, value: str, *, reason: str | None = None) -> None:
        self.key, self.value, self.reason = key, value, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        holds = checkpoint.metadata.get(self.key) == self.value
        return _said(self.reason, f"metadata {self.key} = {self.value}") if holds else None


class MetadataContains(KeyCondition):
    """The safetensors metadata value of ``key`` contains ``fragment``."""

    def __init__(self, key: str, fragment: str, *, reason: str | None = None) -> None:
        self.key, self.fragment, self.reason = key, fragment, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        holds = self.fragment in checkpoint.metadata.get(self.key, "")
        return _said(self.reason, f"metadata {self.key} has {self.fragment}") if holds else None


class FileNameContains(KeyCondition):
    """The file's name contains ``fragment``."""

    def __init__(self, fragment: str, *, reason: str | None = None) -> None:
        self.fragment, self.reason = fragment, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        holds = self.fragment in checkpoint.path.name
        return _said(self.reason, f"file name has {self.fragment}") if holds else None


class KeyShape(KeyCondition):
    """The first tensor whose name fully matches ``pattern`` has a size on ``axis`` in ``one_of`` (any size when
    empty) and not in ``not_one_of``.  ``reason`` may use ``{value}``, the size found."""

    def __init__(
        self,
        pattern: str,
        *,
        axis: int,
        one_of: tuple[int, ...] = (),
        not_one_of: tuple[int, ...] = (),
        reason: str | None = None,
    ) -> None:
        self.pattern, self.axis, self.one_of, self.not_one_of = re.compile(pattern), axis, one_of, not_one_of
        self.reason = reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        shape = next((s for key, s in checkpoint.shapes.items() if self.pattern.fullmatch(key)), None)
        if shape is None or len(shape) <= self.axis:
            return None
        value = shape[self.axis]
        if (self.one_of and value not in self.one_of) or value in self.not_one_of:
            return None
        return _said(None if self.reason is None else self.reason.format(value=value), f"size {value}")


class KeyRank(KeyCondition):
    """The first tensor whose name fully matches ``pattern`` has ``ndim`` dimensions."""

    def __init__(self, pattern: str, *, ndim: int, reason: str | None = None) -> None:
        self.pattern, self.ndim, self.reason = re.compile(pattern), ndim, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        shape = next((s for key, s in checkpoint.shapes.items() if self.pattern.fullmatch(key)), None)
        return _said(self.reason, f"{self.ndim}-D") if shape is not None and len(shape) == self.ndim else None


class KeyCount(KeyCondition):
    """More than ``more_than`` tensor names start with ``prefix``."""

    def __init__(self, prefix: str, *, more_than: int, reason: str | None = None) -> None:
        self.prefix, self.more_than, self.reason = prefix, more_than, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        count = sum(key.startswith(self.prefix) for key in checkpoint.shapes)
        return _said(self.reason, f"{count} {self.prefix}* tensors") if count > self.more_than else None


class NoTensors(KeyCondition):
    """The file holds no tensors at all."""

    def __init__(self, *, reason: str | None = None) -> None:
        self.reason = reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        return None if checkpoint.shapes else _said(self.reason, "no tensors")


class AllOf(KeyCondition):
    """Every condition holds; the evidence of all of them."""

    def __init__(self, *conditions: KeyCondition) -> None:
        self.conditions = conditions

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        collected: list[str] = []
        for condition in self.conditions:
            found = condition.evidence(checkpoint)
            if found is None:
                return None
            collected.extend(phrase for phrase in found if phrase not in collected)
        return tuple(collected)


class AnyOf(KeyCondition):
    """At least one condition holds; the evidence of every one that does."""

    def __init__(self, *conditions: KeyCondition) -> None:
        self.conditions = conditions

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        collected: list[str] | None = None
        for condition in self.conditions:
            found = condition.evidence(checkpoint)
            if found is not None:
                collected = (collected or []) + [phrase for phrase in found if phrase not in (collected or [])]
        return None if collected is None else tuple(collected)


class Not(KeyCondition):
    """``condition`` does not hold; ``reason`` says what that means ("no VAE")."""

    def __init__(self, condition: KeyCondition, *, reason: str = "") -> None:
        self.condition, self.reason = condition, reason

    def evidence(self, checkpoint: OpenedCheckpoint) -> Evidence | None:
        return None if self.condition.holds(checkpoint) else _said(self.reason, "")
