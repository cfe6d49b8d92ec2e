"""The effective configuration as a TOML file (``memosd --print-config``).

Every key with the value the daemon would run with, whatever its source (default, file, environment,
flag), in the layout memosd.toml takes: a newcomer can see what is in force, and save the output as a
starting memosd.toml. Reading the output back gives the same configuration (tests/unit/test_config.py).
"""

from __future__ import annotations

import dataclasses
import json

from memosd.config import SECTIONS, Config


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):  # [cluster] etcd: a TOML array of strings
        return "[" + ", ".join(_value(v) for v in value) + "]"
    # A JSON string is a valid TOML basic string (the same escapes).
    return json.dumps(str(value), ensure_ascii=False)


def render(config: Config) -> str:
    source = str(config.config_file) if config.config_file is not None else "none"
    lines = [f"# memosd's effective configuration (config file read: {source})",
             f"data_dir = {_value(config.data_dir)}"]
    for name in SECTIONS:
        lines.append("")
        lines.append(f"[{name}]")
        for f in dataclasses.fields(getattr(config, name)):
            lines.append(f"{f.name} = {_value(getattr(getattr(config, name), f.name))}")
    return "\n".join(lines) + "\n"


__all__ = ["render"]
