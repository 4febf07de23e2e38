"""Named registries: the extension points for models and datasets.

A registry maps a name (what ``--model=NAME`` or ``--dataset=NAME`` says) to
an entry. Adding a model or a data source is one function plus one
registration line; nothing that uses the registry changes.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from research.errors import UserError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
  """Entries by name, in registration order."""

  def __init__(self, kind: str):
    """Args:
      kind: What the entries are (``model``, ``dataset``), for messages and
        the flag named in them.
    """
    self.kind = kind
    self._entries: dict[str, Entry] = {}

  def register(self, name: str, entry: Entry) -> Entry:
    """Adds ``entry`` under ``name`` and returns it.

    Raises:
      ValueError: if ``name`` is empty or already registered.
    """
    if not name or not name.replace("_", "").isalnum():
      raise ValueError(f"{self.kind} names are letters, digits and _, got "
                       f"{name!r}")
    if name in self._entries:
      raise ValueError(f"{self.kind} {name!r} is already registered")
    self._entries[name] = entry
    return entry

  def unregister(self, name: str) -> None:
    """Removes ``name`` (tests register temporary entries)."""
    self._entries.pop(name, None)

  def get(self, name: str) -> Entry:
    """The entry registered as ``name``.

    Raises:
      UserError: naming the registered choices, if there is no such entry.
    """
    try:
      return self._entries[name]
    except KeyError:
      raise UserError(f"unknown --{self.kind}={name!r}; choose one of "
                      f"{', '.join(self._entries)}") from None

  def names(self) -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

