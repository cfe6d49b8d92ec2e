"""``memosctl train`` and ``memosctl job list|watch|cancel``: the daemon's background jobs (memory training; the
MemReader's extraction, started by ``memosctl mem extract``)."""

from __future__ import annotations

import argparse
from typing import Any

from memosd_client.cli.inputs import natural
from memosd_client.cli.mem import author_arg
from memosd_client.cli.names import Names
from memosd_client.cli.output import Output, fmt_time, to_dict
from memosd_client.cli.progress import Progress, bar
from memosd_client.client import Client
from memosd_client.errors import MemosError
from memosd_client.v1 import types_pb2

DEFAULT_TRAIN_MESSAGE = "memosctl train"

STATES = {
    types_pb2.JOB_STATE_QUEUED: "queued",
    types_pb2.JOB_STATE_RUNNING: "running",
    types_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    types_pb2.JOB_STATE_FAILED: "failed",
    types_pb2.JOB_STATE_CANCELLED: "cancelled",
}


def state_name(job: types_pb2.Job) -> str:
    return STATES.get(job.state, "?")


def fmt_eta(seconds: float) -> str:
    """A short duration: 45s, 3m05s, 1h02m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    minutes, s = divmod(s, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _settings(s: types_pb2.TrainSettings) -> str:
    def value(v: float) -> str:
        return f"{v:g}" if v else "default"

    return f"steps {value(s.steps)}, rank {value(s.rank)}, lr {value(s.learning_rate)}, seed {value(s.seed)}"


def is_extract(job: types_pb2.Job) -> bool:
    return job.kind == types_pb2.JOB_KIND_EXTRACT


def _counts(x: types_pb2.ExtractProgress) -> str:
    return f"kept {x.kept}, dropped {x.dropped}, refused {x.refused} of {x.proposed} proposed"


def _reasons(counts: Any) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "-"


def _result(job: types_pb2.Job) -> str:
    if job.state == types_pb2.JOB_STATE_SUCCEEDED and is_extract(job):
        return f"revision {job.result_revision or '- (nothing kept)'}, {_counts(job.extract)}"
    if job.state == types_pb2.JOB_STATE_SUCCEEDED:
        return f"revision {job.result_revision}, adapter {job.adapter_digest[:12] or '-'}"
    if job.state == types_pb2.JOB_STATE_FAILED:
        return job.error or "failed"
    return "-"


def _extract_block(out: Output, job: types_pb2.Job) -> None:
    x = job.extract
    pairs: list[tuple[str, object]] = [
        ("job id", job.job_id), ("kind", "extract"), ("state", state_name(job)), ("cube id", job.cube_id),
        ("revision", job.revision), ("prompts", f"{job.step}/{job.total_steps}"),
        ("turns", f"{x.turns_read}/{x.turns_total}"), ("items", _counts(x)),
        ("dropped", _reasons(x.dropped_by_reason)), ("refused", _reasons(x.refused_by_reason)),
        ("answers dropped", _reasons(x.answers_dropped_by_reason)),
        ("created", fmt_time(job.create_time)), ("started", fmt_time(job.start_time)),
        ("ended", fmt_time(job.end_time)),
    ]
    if job.state == types_pb2.JOB_STATE_SUCCEEDED:
        pairs += [("result revision", job.result_revision or "- (nothing to commit)"),
                  ("reconciled", f"added {x.added}, updated {x.updated}, retired {x.retired}, "
                                 f"duplicates {x.duplicates}")]
    if job.state == types_pb2.JOB_STATE_FAILED:
        pairs.append(("error", job.error or "-"))
    out.block(pairs)


def job_block(out: Output, job: types_pb2.Job) -> None:
    if is_extract(job):
        _extract_block(out, job)
        return
    pairs: list[tuple[str, object]] = [
        ("job id", job.job_id),
        ("state", state_name(job)),
        ("cube id", job.cube_id),
        ("revision", job.revision),
        ("settings", _settings(job.settings)),
        ("step", f"{job.step}/{job.total_steps}"),
        ("loss", f"{job.loss:.4f}" if job.step else "-"),
    ]
    if job.state == types_pb2.JOB_STATE_RUNNING:
        pairs.append(("eta", fmt_eta(job.eta_seconds) if job.eta_seconds > 0 else "-"))
    pairs += [
        ("created", fmt_time(job.create_time)),
        ("started", fmt_time(job.start_time)),
        ("ended", fmt_time(job.end_time)),
    ]
    if job.state == types_pb2.JOB_STATE_SUCCEEDED:
        pairs += [("result revision", job.result_revision), ("adapter", job.adapter_digest or "-")]
    if job.state == types_pb2.JOB_STATE_FAILED:
        pairs.append(("error", job.error or "-"))
    out.block(pairs)


def emit_job(out: Output, job: types_pb2.Job) -> None:
    if out.json:
        out.emit_json(to_dict(job))
    else:
        job_block(out, job)


class JobProgress(Progress):
    """A job's bar, redrawn from each Job update: a Train job's step/total, loss and ETA; an Extract job's
    prompts and its kept/dropped/refused counts."""

    def __init__(self, out: Output, label: str = "training") -> None:
        super().__init__(0, label, out.stderr, enabled=not (out.quiet or out.json), unit="steps")
        self.job: types_pb2.Job | None = None

    def show(self, job: types_pb2.Job) -> None:
        changed = self.job is None or self.job.state != job.state
        self.job = job
        self.total = job.total_steps
        self.update(job.step - self.done, force=changed)

    def close(self) -> None:
        if self.job is None:  # nothing was shown (the watch failed at once): leave stderr alone
            self.enabled = False
        super().close()

    def render(self, now: float) -> str:
        job = self.job
        state = state_name(job) if job is not None else "?"
        if job is None or not self.total:  # queued, or no total yet: the bar of the job's own kind
            return f"{'reading' if job is not None and is_extract(job) else self.label} {bar(0.0)} {state}"
        frac = min(self.done / self.total, 1.0)
        if is_extract(job):
            x = job.extract
            return (f"reading {bar(frac)} prompt {self.done}/{self.total} {frac:4.0%} kept {x.kept} "
                    f"dropped {x.dropped} refused {x.refused}"
                    + ("" if job.state in (types_pb2.JOB_STATE_RUNNING, types_pb2.JOB_STATE_SUCCEEDED)
                       else f" ({state})"))
        line = f"{self.label} {bar(frac)} step {self.done}/{self.total} {frac:4.0%}"
        line += f" loss {job.loss:.4f}" if job.step else " loss -"
        if job.state == types_pb2.JOB_STATE_RUNNING:
            line += f" eta {fmt_eta(job.eta_seconds)}" if job.eta_seconds > 0 else " eta -"
        elif job.state != types_pb2.JOB_STATE_SUCCEEDED:
            line += f" ({state})"
        return line


def watch(
    client: Client, out: Output, job_id: str, *, first: types_pb2.Job | None = None, cancel_on_interrupt: bool
) -> types_pb2.Job:
    """Follow a job to its end with a progress bar on stderr; its final state.

    ``first`` is a state already known (Train's answer), shown before the watch
    answers. Ctrl-C stops watching (KeyboardInterrupt goes on); with
    ``cancel_on_interrupt`` it first asks the daemon to cancel the job, and
    says what came of it.
    """
    progress = JobProgress(out)
    if first is not None:
        progress.show(first)
    last = first
    updates = client.watch_job(job_id)
    try:
        for last in updates:
            progress.show(last)
    except KeyboardInterrupt:
        updates.close()  # the watch ends before the cancel
        progress.close()
        if cancel_on_interrupt:
            try:
                client.cancel_job(job_id)
            except MemosError as e:
                out.stderr.write(f"memosctl: could not cancel job {job_id}: {e}\n")
            else:
                out.stderr.write(f"memosctl: cancelled job {job_id}\n")
        raise
    finally:
        updates.close()
        progress.close()
    if last is None:
        raise MemosError(f"the watch of job {job_id} ended without a state", reason="WATCH_ENDED")
    return last


def finish(out: Output, job: types_pb2.Job) -> None:
    """Print a job's final state; a job that did not succeed is a failed command (exit 3)."""
    emit_job(out, job)
    if job.state == types_pb2.JOB_STATE_SUCCEEDED:
        return
    if job.state == types_pb2.JOB_STATE_FAILED:
        raise MemosError(f"job {job.job_id} failed: {job.error or 'no reason given'}", reason="JOB_FAILED")
    if job.state == types_pb2.JOB_STATE_CANCELLED:
        raise MemosError(f"job {job.job_id} was cancelled", reason="JOB_CANCELLED")
    raise MemosError(f"the watch of job {job.job_id} ended while it was {state_name(job)}",
                     reason="WATCH_ENDED")


def _train(client: Client, args: argparse.Namespace, out: Output) -> None:
    with client.mount(args.cube) as m:
        job = m.train(steps=args.steps, rank=args.rank, learning_rate=args.lr, seed=args.seed,
                      message=args.message, author=args.author)
        if args.detach:
            emit_job(out, job)
            out.note(f"training in the background; follow it with: memosctl job watch {job.job_id}")
            return
        out.note(f"job {job.job_id}: training cube {job.cube_id or m.cube_id} at revision "
                 f"{job.revision or m.base_revision} (Ctrl-C cancels it)")
        job = watch(client, out, job.job_id, first=job, cancel_on_interrupt=True)
    finish(out, job)


def _list(client: Client, args: argparse.Namespace, out: Output) -> None:
    jobs = client.list_jobs(args.cube)
    if out.json:
        out.emit_json({"jobs": [to_dict(j) for j in jobs]})
        return
    names = Names(client)  # the table names cubes; -o json keeps the ids
    out.table(
        ["JOB ID", "STATE", "CUBE", "REV", "STEP", "LOSS", "CREATED", "RESULT"],
        [
            [j.job_id, state_name(j), names.cube(j.cube_id), j.revision,
             f"{j.step}/{j.total_steps}", f"{j.loss:.4f}" if j.step and not is_extract(j) else "-",
             fmt_time(j.create_time), _result(j)]
            for j in jobs
        ],
    )


def _watch(client: Client, args: argparse.Namespace, out: Output) -> None:
    finish(out, watch(client, out, args.job_id, cancel_on_interrupt=False))


def _cancel(client: Client, args: argparse.Namespace, out: Output) -> None:
    emit_job(out, client.cancel_job(args.job_id))


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = nouns.add_parser(
        "train", help="train a cube's items into its adapter (parametric memory)",
        description="Mount CUBE read-only at HEAD and start a training job that distills its items into a "
                    "LoRA adapter; on success the daemon commits the adapter as a new revision. Follows "
                    "the job with a progress bar (step, loss, ETA) and prints its final state; exits 3 if "
                    "it failed or was cancelled. Ctrl-C cancels the job. With --detach, prints the queued "
                    "job and returns at once. Zero settings mean the daemon's defaults.",
    )
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("--steps", type=natural, default=0, metavar="N", help="training steps")
    p.add_argument("--rank", type=natural, default=0, metavar="R", help="LoRA rank")
    p.add_argument("--lr", type=float, default=0.0, metavar="X", help="learning rate")
    p.add_argument("--seed", type=natural, default=0, metavar="S", help="random seed")
    p.add_argument("-m", "--message", default=DEFAULT_TRAIN_MESSAGE,
                   help="message of the revision that commits the adapter")
    p.add_argument("--detach", action="store_true", help="start the job and return without watching it")
    author_arg(p)
    p.set_defaults(handler=_train)

    job = nouns.add_parser("job", help="list, watch and cancel the daemon's background jobs")
    verbs = job.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("list", help="recent jobs, newest first")
    p.add_argument("cube", nargs="?", default="", metavar="CUBE", help="only this cube's jobs (id or name)")
    p.set_defaults(handler=_list)

    p = verbs.add_parser(
        "watch", help="follow a job to its end",
        description="Follow JOB_ID with a progress bar until it ends and print its final state; exits 3 if "
                    "it failed or was cancelled. Ctrl-C stops watching (the job goes on).",
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(handler=_watch)

    p = verbs.add_parser("cancel", help="stop a queued or running job")
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(handler=_cancel)

