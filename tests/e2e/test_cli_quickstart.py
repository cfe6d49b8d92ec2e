"""The README quickstart, run as a user would: memosctl against the running daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from daemon_proc import DaemonProcess

MEMOSCTL = [sys.executable, "-m", "memosd_client.cli.main"]


def ctl(daemon: DaemonProcess, *args: str, ok: bool = True, token_file: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMOS_TARGET": daemon.address,
           "MEMOS_TOKEN_FILE": str(token_file or daemon.data_dir / "admin.token")}
    done = subprocess.run([*MEMOSCTL, *args], capture_output=True, text=True, env=env, timeout=120)
    if ok:
        assert done.returncode == 0, f"memosctl {' '.join(args)}: {done.stderr}"
    return done


def as_json(daemon: DaemonProcess, *args: str) -> dict:  # type: ignore[type-arg]
    return json.loads(ctl(daemon, "-o", "json", *args).stdout)  # type: ignore[no-any-return]


def test_readme_quickstart(daemon: DaemonProcess, tmp_path: Path) -> None:
    ctl(daemon, "cube", "alloc", "qs-notes")
    ctl(daemon, "mem", "write", "qs-notes", "Ada Lovelace wrote the first published algorithm", "--tag", "people")
    ctl(daemon, "mem", "write", "qs-notes", "The Analytical Engine was designed by Charles Babbage",
        "--tag", "machines")
    table = ctl(daemon, "mem", "search", "qs-notes", "-q", "who designed the engine?", "-k", "2").stdout
    assert table.splitlines()[1].split()[0] == "1" and "Charles Babbage" in table.splitlines()[1]
    hits = as_json(daemon, "mem", "search", "qs-notes", "-q", "Ada", "-k", "1")["hits"]
    ada = hits[0]["item"]["item_id"]
    assert [r["number"] for r in as_json(daemon, "log", "qs-notes")["revisions"]] in (["2", "1"], [2, 1])
    ctl(daemon, "mem", "forget", "qs-notes", ada)
    diff = as_json(daemon, "diff", "qs-notes", "2", "3")["changes"]
    assert [(c["item_id"], c["kind"]) for c in diff] == [(ada, "CHANGE_KIND_FORGOTTEN")]
    ctl(daemon, "rollback", "qs-notes", "2")
    items = as_json(daemon, "mem", "read", "qs-notes")["items"]
    assert sorted(i["text"] for i in items) == ["Ada Lovelace wrote the first published algorithm",
                                                 "The Analytical Engine was designed by Charles Babbage"]
    assert "cubes:" in ctl(daemon, "stats").stdout


def test_jsonl_write_shows_progress_and_exit_codes(daemon: DaemonProcess, tmp_path: Path) -> None:
    ctl(daemon, "cube", "alloc", "qs-bulk")
    lines = [json.dumps({"text": f"bulk memory {i}", "tags": ["bulk"]}) for i in range(600)]
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    done = ctl(daemon, "mem", "write", "qs-bulk", "--file", str(tmp_path / "items.jsonl"))
    assert "600" in done.stderr  # the progress line counts up to the total
    assert as_json(daemon, "cube", "stat", "qs-bulk")["item_count"] in ("600", 600)
    assert ctl(daemon, "cube", "stat", "qs-missing", ok=False).returncode == 3
    assert ctl(daemon, "cube", "bogus", ok=False).returncode == 2
    assert ctl(daemon, "cube", "free", "qs-bulk", ok=False).returncode == 2  # needs --yes
    ctl(daemon, "cube", "free", "qs-bulk", "--yes")
    unreachable = subprocess.run([*MEMOSCTL, "--target", "127.0.0.1:1", "--timeout", "3", "stats"],
                                 capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 4


def test_readme_access_control(daemon: DaemonProcess, tmp_path: Path) -> None:
    """The README's governance walk-through: a principal, a grant, its effect, the audit chain."""
    token = tmp_path / "bob.token"
    ctl(daemon, "principal", "create", "cli-bob", "--kind", "agent", "--token-out", str(token))
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    assert "cli-bob" in ctl(daemon, "whoami", token_file=token).stdout
    # A token file that exists is never overwritten, and then no principal is made (its token would be lost).
    taken = ctl(daemon, "principal", "create", "cli-carol", "--token-out", str(token), ok=False)
    assert taken.returncode == 2 and "--token-out" in taken.stderr
    assert "cli-carol" not in ctl(daemon, "principal", "list").stdout
    # A refused create leaves no empty token file behind.
    again = ctl(daemon, "principal", "create", "cli-bob", "--token-out", str(tmp_path / "dup.token"), ok=False)
    assert again.returncode == 3 and not (tmp_path / "dup.token").exists()
    ctl(daemon, "cube", "alloc", "cli-shared")
    ctl(daemon, "mem", "write", "cli-shared", "the key is under the mat")
    missing = ctl(daemon, "cube", "stat", "cli-shared", ok=False, token_file=token)
    assert missing.returncode == 3 and "CUBE_NOT_FOUND" in missing.stderr
    ctl(daemon, "grant", "cli-shared", "cli-bob", "read")
    assert "under the mat" in ctl(daemon, "mem", "read", "cli-shared", token_file=token).stdout
    refused = ctl(daemon, "mem", "write", "cli-shared", "bob's note", ok=False, token_file=token)
    assert refused.returncode == 3 and "PERMISSION_DENIED" in refused.stderr
    grants = ctl(daemon, "grants", "cli-shared").stdout
    assert "read" in grants
    # Names, not ids, in the table (the ids stay in -o json): the cube, the grantee and the granter.
    bob_row = next(line.split() for line in grants.splitlines() if "cli-bob" in line)
    assert (bob_row[0], bob_row[1], bob_row[2], bob_row[-1]) == ("cli-shared", "cli-bob", "read", "admin")
    assert "prn_" not in grants and "cube_" not in grants
    assert as_json(daemon, "grants", "cli-shared")["grants"][0]["cube_id"].startswith("cube_")
    ctl(daemon, "revoke", "cli-shared", "cli-bob")
    assert ctl(daemon, "cube", "stat", "cli-shared", ok=False, token_file=token).returncode == 3
    records = as_json(daemon, "audit", "list", "--cube", "cli-shared")["records"]
    assert {"Grant", "Revoke", "Read"} <= {r["method"] for r in records}
    assert "intact" in ctl(daemon, "audit", "verify").stdout
    audit = ctl(daemon, "audit", "list", "--cube", "cli-shared").stdout.splitlines()
    assert any(row.split()[2:5] == ["admin", "Grant", "cli-shared"] for row in audit[1:]), audit
    # --principal takes a name as well as an id; a name nobody has is refused, not an empty listing.
    bobs = as_json(daemon, "audit", "list", "--principal", "cli-bob")["records"]
    assert bobs and {r["method"] for r in bobs} >= {"WhoAmI", "Read"}
    assert len({r["principal_id"] for r in bobs}) == 1 and bobs[0]["principal_id"].startswith("prn_")
    nobody = ctl(daemon, "audit", "list", "--principal", "cli-nobody", ok=False)
    assert nobody.returncode == 2 and "no principal named 'cli-nobody'" in nobody.stderr
    # A purge that matches nothing says so, instead of printing a receipt of zeros.
    nothing = ctl(daemon, "purge", "cli-shared", "--source", "chat-2024-05", "--yes").stdout
    assert nothing == "nothing matched --source chat-2024-05 in cube cli-shared; nothing was purged\n"
    denied = ctl(daemon, "audit", "list", ok=False, token_file=token)
    assert denied.returncode == 3 and "PERMISSION_DENIED" in denied.stderr
