"""``memosctl completion bash``: a bash completion script, made from the parser itself.

The script holds two tables drawn from argparse (the subcommands and the options at each level), so it
names every command that is registered, including ones added later, without a list to keep in step. It
completes command words and option names; not values (cube names would need a call to the daemon on every
<Tab>). zsh users can load it after ``autoload -U bashcompinit && bashcompinit``.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator

from memosd_client.cli.output import Output

_SCRIPT = """\
# bash completion for memosctl (memosctl completion bash). -g: bash-completion sources this inside a function.
declare -gA _memosctl_children=(
{children}
)
declare -gA _memosctl_options=(
{options}
)
_memosctl() {{
  local cur="${{COMP_WORDS[COMP_CWORD]}}" path=memosctl word i
  for ((i = 1; i < COMP_CWORD; i++)); do
    word="${{COMP_WORDS[i]}}"
    # A word naming a subcommand of the current level descends into it; anything else (an option, a value,
    # a positional argument) leaves the level as it is.
    if [[ " ${{_memosctl_children[$path]}} " == *" $word "* ]]; then
      path="$path $word"
    fi
  done
  if [[ "$cur" == -* ]]; then
    COMPREPLY=($(compgen -W "${{_memosctl_options[$path]}}" -- "$cur"))
  else
    COMPREPLY=($(compgen -W "${{_memosctl_children[$path]}}" -- "$cur"))
  fi
}}
complete -F _memosctl memosctl
"""


ROOT = "memosctl"  # the key of the top level (bash refuses an empty key in an associative array)


def _levels(parser: argparse.ArgumentParser, path: str = ROOT) -> Iterator[tuple[str, list[str], list[str]]]:
    """(path, subcommand names, option strings) for the parser and every subparser below it."""
    children: list[str] = []
    subs: list[tuple[str, argparse.ArgumentParser]] = []
    options: list[str] = []
    # argparse has no public walk of its actions; _actions has been stable for years (main.py walks it too).
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                children.append(name)
                subs.append((f"{path} {name}", sub))
        else:
            options.extend(action.option_strings)
    yield path, children, options
    for sub_path, sub in subs:
        yield from _levels(sub, sub_path)


def bash_script(parser: argparse.ArgumentParser) -> str:
    levels = list(_levels(parser))
    children = "\n".join(f"  [{shlex.quote(path)}]={shlex.quote(' '.join(names))}" for path, names, _ in levels)
    options = "\n".join(f"  [{shlex.quote(path)}]={shlex.quote(' '.join(opts))}" for path, _, opts in levels)
    return _SCRIPT.format(children=children, options=options)


def print_script(args: argparse.Namespace, out: Output) -> None:
    from memosd_client.cli.main import build_parser  # main imports this module

    out.stdout.write(bash_script(build_parser()))


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = nouns.add_parser("completion", help="print a shell completion script (bash; zsh via bashcompinit)",
                         description="Print a bash completion script for memosctl; it needs no daemon. Install "
                                     "it with: memosctl completion bash > ~/.local/share/bash-completion/"
                                     "completions/memosctl (or add `source <(memosctl completion bash)` to "
                                     "~/.bashrc).")
    p.add_argument("shell", choices=["bash"])
    p.set_defaults(local=print_script)
