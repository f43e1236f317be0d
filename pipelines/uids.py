"""Deterministic UIDs for outputs: the same job on the same inputs gets the same UIDs.

So a re-run job (after a crash, or an operator retry) writes objects a PACS already has
under the same identity, and a re-delivery is idempotent. UIDs derive from a hash of the
job key (job id + the input SOP Instance UIDs) and a name for each object, under the
configured organisation root; the default root ``2.25.`` is the UUID form of
ISO/IEC 9834-8 (a 128-bit integer), which needs no registration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pydicom.uid import RE_VALID_UID

MAX_UID = 64


def job_key(job_id: int | str, input_sop_uids: Iterable[str]) -> str:
    """A stable key for one job version: its id and the sorted input instances."""
    digest = hashlib.sha256()
    digest.update(str(job_id).encode())
    for uid in sorted(input_sop_uids):
        digest.update(b"\0" + uid.encode())
    return digest.hexdigest()


def derive_uid(root: str, *parts: str) -> str:
    """A valid UID under ``root``, determined by ``parts``."""
    if root and not root.endswith("."):
        root += "."
    if not RE_VALID_UID.match(root + "1"):
        raise ValueError(f"organisation UID root {root!r} is not a valid UID prefix")
    number = int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:16], "big")
    if root == "2.25.":
        return root + str(number)
    room = MAX_UID - len(root)
    if room < 10:
        raise ValueError(f"organisation UID root {root!r} leaves fewer than 10 digits for the suffix")
    suffix = str(number)[:room].lstrip("0") or "1"
    return root + suffix


def derived_frame_of_reference(root: str, series_uid: str) -> str:
    """The Frame of Reference UID given to the outputs of a series that has none.

    Determined by the series alone (not the job): every pipeline and every re-run on the
    series puts its outputs on the same frame, so they overlay one another; another
    series, which may have been moved or re-positioned, never shares it.
    """
    return derive_uid(root, "frame-of-reference", series_uid)


class UidFactory:
    """UIDs for the objects of one job: ``series("restored")``, ``instance("restored", 7)``."""

    def __init__(self, root: str, key: str) -> None:
        self.root = root
        self.key = key

    def series(self, name: str) -> str:
        return derive_uid(self.root, self.key, "series", name)

    def instance(self, name: str, index: int = 0) -> str:
        return derive_uid(self.root, self.key, "instance", name, str(index))
