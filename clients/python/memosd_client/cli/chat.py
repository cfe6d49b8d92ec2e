"""``memosctl chat``: talk to the daemon's model with the memory of one or more cubes."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack

from memosd_client.cli.cubes import SOURCES
from memosd_client.cli.inputs import UsageError, natural
from memosd_client.cli.output import Output, fmt_ms, to_dict
from memosd_client.client import Client, MessageLike, MountHandle
from memosd_client.errors import MemosError, OutOfRange
from memosd_client.v1 import types_pb2

PROMPT = "you> "
EXIT_COMMAND = "/exit"
MODEL_POLL_SECONDS = 0.5

_FINISH = {
    types_pb2.FINISH_REASON_END: "end",
    types_pb2.FINISH_REASON_LENGTH: "length",
    types_pb2.FINISH_REASON_STOP: "stop",
}


def summary_line(s: types_pb2.GenerationSummary) -> str:
    """One line of token counts and timings. The rate is the decode rate: tokens after the first."""
    decode_s = (s.total_us - s.ttft_us) / 1e6
    rate = f"{(s.completion_tokens - 1) / decode_s:.1f}" if s.completion_tokens > 1 and decode_s > 0 else "-"
    return (
        f"prompt {s.prompt_tokens} tokens ({s.reused_tokens} reused, {s.prefilled_tokens} prefilled), "
        f"{s.completion_tokens} generated ({_FINISH.get(s.finish_reason, '?')}), "
        f"ttft {fmt_ms(s.ttft_us)}, total {fmt_ms(s.total_us)}, {rate} tokens/s"
    )


def remembered_line(s: types_pb2.GenerationSummary, cube: str, session_id: str) -> str:
    """Where --remember recorded the exchange."""
    return (f"remembered in {cube} at revision {s.remembered.number} "
            f"({len(s.remembered_item_ids)} turns, session {session_id})")


def _items(items: list[types_pb2.UsedItem], scored: bool) -> str:
    def one(it: types_pb2.UsedItem) -> str:
        rev = f"@{it.born_revision}" if it.born_revision else "@staged"
        return f"{it.item_id}{rev}" + (f" ({it.score:.3f})" if scored else "")

    return ", ".join(one(it) for it in items) or "-"


def memory_lines(s: types_pb2.GenerationSummary, names: Mapping[str, str]) -> list[str]:
    """What each mount contributed: cube, revision, KV reuse, and the items in the prompt."""
    lines = ["memory used:"]
    for use in s.memory:
        name = names.get(use.mount_id, use.cube_id)
        where = f" from {SOURCES.get(use.cache_source, '?')} (key {use.cache_key[:12]})" if use.cache_key else ""
        if not use.activated:
            how = "not activated"
        elif use.block_reuse == types_pb2.BLOCK_REUSE_COMPOSED:
            how = (f"activated, composed: {use.block_reused_tokens} of {use.block_tokens} block tokens placed "
                   f"from its own cache{where}, {use.block_computed_tokens} recomputed")
        elif use.block_tokens:  # per-block counts (daemons since issue 13's exact combinations)
            how = (f"activated, {use.block_reused_tokens} of {use.block_tokens} block tokens reused{where}"
                   if use.block_reused_tokens else f"activated, block prefilled ({use.block_tokens} tokens)")
        elif use.cache_key:
            how = f"activated, KV reused{where}"
        else:
            how = "activated, block prefilled"
        lines.append(f"  {name} ({use.cube_id}) at revision {use.revision}: {how}")
        if use.block_note:
            lines.append(f"    not composed: {use.block_note}")
        lines.append(f"    block items ({len(use.block_items)}): {_items(list(use.block_items), False)}")
        lines.append(f"    retrieved ({len(use.retrieved_items)}): {_items(list(use.retrieved_items), True)}")
    if not s.memory:
        lines.append("  none")
    return lines


class _Chat:
    """The mounted cubes and generation options shared by every turn."""

    def __init__(
        self, client: Client, args: argparse.Namespace, out: Output, mounts: list[MountHandle],
        adapter_mount: MountHandle | None = None, model_ready: bool = False,
        remember_mount: MountHandle | None = None,
    ) -> None:
        self.client, self.args, self.out, self.mounts = client, args, out, mounts
        self.adapter_mount = adapter_mount
        # --remember: every reply that ends is recorded in that cube, all of this chat's turns in one session.
        self.remember_mount = remember_mount
        self.session_id = args.session or f"chat-{uuid.uuid4().hex[:16]}"
        # --adapter-only: the adapter's parametric memory by itself, so no cube's block or retrieval feeds the
        # prompt. The adapter's mount is sent alone as options.adapter_mount_id (it need not be in mount_ids).
        self.memory_mounts: list[MountHandle] = [] if args.adapter_only else mounts
        # With the model known to be loaded, a reply is cut off only when the daemon goes silent for --timeout
        # (a slow CPU streaming a long reply is progress); otherwise the first token may wait for the model
        # load, and the reply gets the client's whole-stream deadline (--timeout plus 0.5 s a token).
        self.idle_timeout = args.timeout if model_ready else None
        # Show cubes as the user named them, not by their ids.
        self.names = {m.mount_id: cube for m, cube in zip(mounts, args.cubes, strict=True)}

    def reply(self, messages: list[MessageLike], *, interactive: bool) -> str | None:
        """Generate and print one reply; its text, or None when Ctrl-C cancelled it (interactive only)."""
        a, out = self.args, self.out
        gen = self.client.generate(
            messages, self.memory_mounts, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
            stop=a.stop, seed=a.seed, retrieve_k=a.retrieve_k, adapter_mount=self.adapter_mount,
            remember_mount=self.remember_mount, session_id=self.session_id if self.remember_mount else "",
            compose=a.compose, compose_recompute=a.recompute, idle_timeout=self.idle_timeout,
        )
        started = False  # whether a partial line is on stdout
        with gen:  # cancels the call if anything below fails
            try:
                if out.json:
                    text = gen.text()
                else:
                    for delta in gen:
                        started = True
                        out.stdout.write(delta)
                        out.stdout.flush()
                    out.stdout.write("\n")
                    out.stdout.flush()
                    started = False
                    text = gen.text()
            except KeyboardInterrupt:
                if not interactive:
                    raise
                gen.cancel()
                if started:
                    out.stdout.write("\n")
                    out.stdout.flush()
                out.stderr.write("(reply cancelled)\n")
                return None
            except MemosError:
                if started:  # end the partial reply's line before the error is reported
                    out.stdout.write("\n")
                    out.stdout.flush()
                raise
        summary = gen.summary
        if out.json:
            out.emit_json({"text": text, "summary": to_dict(summary) if summary is not None else None})
            out.stdout.flush()
            return text
        if summary is not None:
            out.note(summary_line(summary))
            if summary.HasField("remembered"):
                out.note(remembered_line(summary, a.remember, self.session_id))
            if a.show_memory:
                out.stderr.write("\n".join(memory_lines(summary, self.names)) + "\n")
        return text


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams (tests, daemons)
        return False


def _lines(out: Output) -> Iterator[str]:
    """The user's lines: with a prompt on a terminal, silently from a pipe."""
    tty = _stdin_is_tty()
    while True:
        if tty:
            try:
                line = input(PROMPT)
            except EOFError:
                out.stdout.write("\n")
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        yield line.strip()


def _interactive(chat: _Chat, history: list[MessageLike]) -> None:
    for line in _lines(chat.out):
        if line == EXIT_COMMAND:
            return
        if not line:
            continue
        history.append(("user", line))
        try:
            text = chat.reply(history, interactive=True)
        except OutOfRange as e:  # the conversation outgrew the model's context: refuse this turn only
            chat.out.stderr.write(f"memosctl: error: {e}\n")
            text = None
        if text is None:
            history.pop()  # a cancelled or refused turn is not part of the conversation
        else:
            history.append(("assistant", text))


def _adapter_mount(cube: str, cubes: list[str], mounts: list[MountHandle]) -> MountHandle:
    """The mount of the chat's cube named ``cube`` (as given on the command line, or by its id)."""
    for name, m in zip(cubes, mounts, strict=True):
        if cube == name:
            return m
    for m in mounts:
        if cube == m.cube_id:
            return m
    raise UsageError(f"--adapter {cube!r} is not one of the chat's cubes ({', '.join(cubes)})")


def adapter_digest_at(client: Client, mount: MountHandle) -> str:
    """The digest of the adapter the mount's cube holds at the mount's revision ("" for none), from Log
    (newest first: the mount is at HEAD, so this is normally the first revision of the first page)."""
    for rev in client.log(mount.cube_id, page_size=8):
        if rev.number <= mount.base_revision:
            return rev.adapter_digest
    return ""


def _pick_adapter(client: Client, args: argparse.Namespace, mounts: list[MountHandle],
                  out: Output) -> MountHandle | None:
    """The mount whose cube's adapter the chat generates with, or None for the base model.

    By default the first of the chat's cubes (in the order given) that holds an adapter: a cube activated
    after ``memosctl train`` has its block's KV computed under its adapter (the digest is part of the cache
    key), so generating with the base model would prefill the block instead of reusing it, and would leave
    the trained memory out. ``--no-adapter`` chooses the base model, ``--adapter CUBE`` a given cube."""
    if args.no_adapter:
        return None
    if args.adapter is not None:
        return _adapter_mount(args.adapter, args.cubes, mounts)
    for cube, mount in zip(args.cubes, mounts, strict=True):
        digest = adapter_digest_at(client, mount)
        if digest:
            out.note(f"memosctl: generating with the adapter of cube {cube!r} ({digest[:12]}); "
                     "--no-adapter for the base model")
            return mount
    return None


def wait_for_model(client: Client, out: Output) -> bool:
    """Wait while the daemon's model loads, saying so once; whether it is known to be loaded now.

    A chat sent while the model loads would otherwise wait silently (the first start dequantizes it, tens
    of seconds). Stats is for admins: for anyone else the state is unknown and this returns False at once.
    A model that failed or is off is not waited for: Generate then says why."""
    try:
        state = client.stats().model.state
        if state == "loading":
            out.note("memosctl: the model is loading (memosd loads it in the background after it starts; "
                     "the first start takes longest); the reply starts when it is ready...")
            while state == "loading":
                time.sleep(MODEL_POLL_SECONDS)
                state = client.stats().model.state
    except MemosError:
        return False
    return state == "ready"


def _chat(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.message is not None and not args.message.strip():
        raise UsageError("-m/--message is empty")
    if args.adapter_only and args.retrieve_k:
        raise UsageError("--adapter-only retrieves nothing: leave out -k/--retrieve-k")
    history: list[MessageLike] = [("system", args.system)] if args.system else []
    if args.session is not None and args.remember is None:
        raise UsageError("--session names the session of remembered turns: give --remember CUBE too")
    with ExitStack() as stack:
        # The remember cube, when it is also one of the chat's cubes, is mounted once, read-write: the chat
        # then reads what it remembered (an Ingest moves the mount to its new revision).
        mounts = [stack.enter_context(client.mount(cube, writable=cube == args.remember)) for cube in args.cubes]
        remember = None
        if args.remember is not None:
            remember = next((m for cube, m in zip(args.cubes, mounts, strict=True) if cube == args.remember), None)
            remember = remember or stack.enter_context(client.mount(args.remember, writable=True))
        adapter = _pick_adapter(client, args, mounts, out)
        if args.adapter_only and adapter is None:
            raise UsageError("--adapter-only: none of the chat's cubes holds an adapter (memosctl train CUBE, or "
                             "memosctl adapter import CUBE DIR)" if not args.no_adapter
                             else "--adapter-only and --no-adapter leave nothing to generate with")
        chat = _Chat(client, args, out, mounts, adapter, model_ready=wait_for_model(client, out),
                     remember_mount=remember)
        if args.message is not None:
            chat.reply([*history, ("user", args.message)], interactive=False)
        else:
            _interactive(chat, history)


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = nouns.add_parser(
        "chat", help="talk to the daemon's model with the memory of one or more cubes",
        description="Mount each CUBE read-only at HEAD and generate replies with their memory: the "
                    "memory block of an activated cube (its KV cache reused), then the items retrieved "
                    "for the last message. With -m, answer one message and exit; otherwise read "
                    f"messages from stdin, one a line, until end of input or {EXIT_COMMAND} (Ctrl-C "
                    "cancels the reply in progress). The reply streams to stdout, a summary of tokens "
                    "and timings goes to stderr; with -o json each reply is one JSON object "
                    '{"text", "summary"} instead. While the model loads, a note says so and the reply waits '
                    "for it. A reply streaming on a slow CPU is not cut off: it fails only when the daemon "
                    "sends nothing for --timeout seconds (for a caller that may not read Stats, which is for "
                    "admins: --timeout plus 0.5 s for each token it may generate). Adapters: by default the model "
                    "generates with the LoRA adapter of the first CUBE that holds one (after memosctl train "
                    "CUBE, that is the trained memory, and an activated block, computed under the adapter, is "
                    "reused), and says so on stderr; --adapter CUBE picks the cube, --no-adapter uses the "
                    "base model. --adapter-only generates with the adapter alone: no memory block and no "
                    "retrieved items, to see what the adapter learned.",
    )
    p.add_argument("cubes", nargs="+", metavar="CUBE", help="cube ids or names")
    p.add_argument("-m", "--message", metavar="TEXT", help="send this one message and exit")
    p.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    p.add_argument("--max-tokens", type=natural, default=0, metavar="N",
                   help="tokens to generate at most (default: the daemon's, 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=0.0, metavar="P", help="nucleus sampling mass; 0 means off")
    p.add_argument("--stop", action="append", default=[], metavar="S",
                   help="stop before this string; repeat for more")
    p.add_argument("--seed", type=natural, default=0, metavar="N", help="sampling seed; 0 picks one")
    p.add_argument("-k", "--retrieve-k", type=natural, default=None, metavar="N",
                   help="items to retrieve for each message (default: the daemon's; 0 none)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", metavar="CUBE",
                       help="generate with this cube's adapter; one of the chat's cubes (name or id). Default: "
                            "the first of the chat's cubes that holds an adapter")
    which.add_argument("--no-adapter", action="store_true",
                       help="generate with the base model, even where a cube holds an adapter")
    p.add_argument("--adapter-only", action="store_true",
                   help="the adapter alone: no memory block, no retrieval (the parametric memory by itself)")
    p.add_argument("--remember", metavar="CUBE",
                   help="record each reply that ends, with the message it answers, in this cube (read-write; "
                        "one of the chat's cubes or another): two turns in one new revision whose log entry "
                        "names the model, the adapter and the memory used (memosctl log). A cancelled reply "
                        "records nothing")
    p.add_argument("--session", metavar="ID",
                   help="the session of the remembered turns (default: a new one for this chat)")
    p.add_argument("--compose", choices=("exact", "composed", "auto"), default="",
                   help="how activated cubes after the first reuse their KV caches: exact (only a combination "
                        "seen before), composed (each cube's own cache placed after the others: faster, an "
                        "approximation), auto (exact where seen, composed elsewhere); default: the daemon's "
                        "runtime.compose")
    p.add_argument("--recompute", type=float, default=None, metavar="F",
                   help="with --compose composed or auto: the share (0-1) of each composed block's first tokens "
                        "recomputed; default: the daemon's runtime.compose_recompute")
    p.add_argument("--show-memory", action="store_true",
                   help="after each reply, list on stderr the cubes, revisions and items it used")
    p.set_defaults(handler=_chat)
