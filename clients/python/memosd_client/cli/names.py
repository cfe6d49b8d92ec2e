"""Names for the ids in a table: ``notes`` rather than ``cube_agrd…``, ``bob`` rather than ``prn_…``.

Tables only; ``-o json`` keeps the ids (scripts want the stable key). Each lookup is one listing call, made
the first time a table needs it and kept for the rest of the command: ListCubes (the cubes the caller can
see) and ListPrincipals (admins only). A listing the caller may not make, or that fails, leaves the ids as
they are: a name is a convenience, never a reason for a command to fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from memosd_client.cli.inputs import UsageError
from memosd_client.client import Client
from memosd_client.errors import MemosError

PRINCIPAL_ID_PREFIX = "prn_"


class Names:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._cubes: dict[str, str] | None = None
        self._principals: dict[str, str] | None = None

    @staticmethod
    def _load(pairs: Callable[[], Iterable[tuple[str, str]]]) -> dict[str, str]:
        try:
            return dict(pairs())
        except MemosError:
            return {}

    def cube(self, cube_id: str) -> str:
        """The cube's name, or its id when unknown ("-" for none)."""
        if not cube_id:
            return "-"
        if self._cubes is None:
            self._cubes = self._load(lambda: ((c.cube_id, c.name) for c in self._client.list_cubes()))
        return self._cubes.get(cube_id) or cube_id

    def _principal_names(self) -> dict[str, str]:
        """Principal id -> name: every principal for an admin, else the caller alone."""
        if self._principals is None:
            self._principals = self._load(
                lambda: ((p.principal_id, p.name) for p in self._client.list_principals()))
            if not self._principals:  # not an admin: the caller's own name is still cheap to know
                me = self._load(lambda: [(w.principal_id, w.name) for w in [self._client.whoami()]])
                self._principals.update(me)
        return self._principals

    def principal(self, principal_id: str) -> str:
        """The principal's name, or its id when unknown ("-" for none)."""
        if not principal_id:
            return "-"
        return self._principal_names().get(principal_id) or principal_id

    def principal_id(self, ref: str) -> str:
        """The id of the principal ``ref`` names: an id as it is, a name looked up (every name for an
        admin, the caller's own otherwise). Raises ``UsageError`` for a name not found: a filter on it
        would match nothing and say nothing."""
        if ref.startswith(PRINCIPAL_ID_PREFIX):
            return ref
        by_name = {name: pid for pid, name in self._principal_names().items()}
        if ref not in by_name:
            raise UsageError(f"no principal named {ref!r} that you can see; pass its id (prn_...) or a name "
                             "from `memosctl principal list`")
        return by_name[ref]
