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


def new_id(prefix: str) -> str:
    raw = (time.time_ns() // 1_000_000).to_bytes(6, "big") + secrets.token_bytes(6)
    return prefix + base64.b32encode(raw).decode().rstrip("=").lower()
