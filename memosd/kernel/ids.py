"""Identifiers the daemon assigns: a prefix plus 20 lowercase base32 characters.

The first 6 bytes are the creation time in milliseconds, so ids sort roughly by
creation; the last 6 are random, so two daemons (or a restart) never collide in
practice.
"""

from __future__ import annotations

import base64
import re
import secrets
import time

CUBE_PREFIX = "cube_"
ITEM_PREFIX = "itm_"
MOUNT_PREFIX = "mnt_"
JOB_PREFIX = "job_"
PURGE_PREFIX = "prg_"
PRINCIPAL_PREFIX = "prn_"

# Match these with fullmatch(). \A and \Z (not ^ and $, where "$" also accepts a
# trailing newline) keep even a plain match() from letting "notes\n" through.
_BODY = r"[a-z2-7]{20}"
CUBE_ID_RE = re.compile(rf"\A{CUBE_PREFIX}{_BODY}\Z")
ITEM_ID_RE = re.compile(rf"\A{ITEM_PREFIX}{_BODY}\Z")
MOUNT_ID_RE = re.compile(rf"\A{MOUNT_PREFIX}{_BODY}\Z")
PRINCIPAL_ID_RE = re.compile(rf"\A{PRINCIPAL_PREFIX}{_BODY}\Z")
CUBE_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


TAG_BYTES = 3  # a node tag's length: the first 3 of the 6 random bytes (in a cluster, mount ids carry one)


def new_id(prefix: str, tag: bytes = b"") -> str:
    """A new id; ``tag`` (at most TAG_BYTES) takes the place of the first random bytes, so a cluster node's
    mount ids name their node (kernel/ports.py, DirectoryPort.node_tag) and any node can route them."""
    if len(tag) > TAG_BYTES:
        raise ValueError(f"an id tag is at most {TAG_BYTES} bytes")
    raw = (time.time_ns() // 1_000_000).to_bytes(6, "big") + tag + secrets.token_bytes(6 - len(tag))
    return prefix + base64.b32encode(raw).decode().rstrip("=").lower()


def tag_of(id_: str, prefix: str) -> bytes:
    """The TAG_BYTES an id made with a tag carries (any id gives some bytes: the caller matches them)."""
    body = id_[len(prefix):]
    if not id_.startswith(prefix) or len(body) != 20:
        return b""
    try:
        return base64.b32decode(body.upper() + "====")[6:6 + TAG_BYTES]
    except ValueError:
        return b""
