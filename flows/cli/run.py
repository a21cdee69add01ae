"""`speechpairs run CONFIG`: check the config and corpus, run the generate flow with a progress bar and
stop on SIGTERM/SIGINT, then print what was committed (or why not, and how to resume)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flows.cli.base import (
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_NOT_COMMITTED,
    EXIT_OK,
    EXIT_USAGE,
    add_progress_options,
    prefect_api,
    quiet_prefect,
    say,
)

if TYPE_CHECKING:  # the CLI imports the pipeline only once it runs
    from tasks.pipeline import Progress, ProgressHook


def _announce_flow_run(links: list[str]) -> Callable[..., None]:
    """An `on_running` flow hook that prints the run's UI page as soon as the flow run exists."""

    def hook(_flow: Any, flow_run: Any, _state: Any) -> None:
        from flows.local_server import flow_run_url

        url = flow_run_url(flow_run.id)
        if url and not links:
            links.append(url)
            say(f"flow run {flow_run.name}: {url}")

    return hook


def _progress_bar(enabled: bool, clock: Callable[[], float] = time.monotonic
                  ) -> tuple[ProgressHook | None, Callable[[], None]]:
    """The terminal bar (a tasks.pipeline ProgressHook, passed into the flow): planned clips done/total
    (a long recording counts once), then rows, quarantined (clips, recordings that failed whole and
    segments), recordings cut and their segments so far, rate and ETA; at the end, the run summary's
    numbers. The rate is flows/progress.py's: measured from the first finished batch, so Prefect
    start-up, model loading and planning stay out of it, and so do shards an earlier attempt finished."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    from flows.progress import ProgressMeter

    meter = ProgressMeter(clock=clock)
    bar = tqdm(total=None, unit="clip", desc="clips", dynamic_ncols=True, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    lock = threading.Lock()

    def hook(event: Progress) -> None:
        with lock:
            if event.kind == "total":
                meter.clips_total = event.clips
                bar.total = event.clips
            else:
                meter.add(event.clips, event.rows, reused=event.kind == "reused", quarantined=event.quarantined,
                          recordings_cut=event.recordings_cut, segments=event.segments)
                bar.update(event.clips)
            bar.set_postfix_str(meter.postfix(), refresh=False)
            bar.refresh()

    return hook, bar.close


STOP_GRACE_S = 20.0  # after a stop request, exit anyway once this long has passed


def _stop_on_signals() -> Callable[[], None]:
    """SIGTERM/SIGINT ask the run to stop (tasks/stopping.py): no new clip starts, shards in flight
    are abandoned, and the command exits 128+signal. A second signal, or work still running
    STOP_GRACE_S later (a model call that cannot be cut short), exits at once. Returns a function
    that puts the previous handlers back."""
    from tasks.stopping import request_stop, stop_requested

    def exit_later(signum: int) -> None:
        time.sleep(STOP_GRACE_S)
        print(f"speechpairs: still busy {STOP_GRACE_S:.0f} s after the stop request; exiting now", file=sys.stderr,
              flush=True)
        os._exit(128 + signum)

    def handler(signum: int, _frame: Any) -> None:
        if stop_requested():
            os._exit(128 + signum)
        request_stop(signum)
        print(f"speechpairs: {signal.Signals(signum).name} received: stopping (no new clip starts; shards in "
              "flight are abandoned and redone by the next run; a second signal exits at once)",
              file=sys.stderr, flush=True)
        threading.Thread(target=exit_later, args=(signum,), daemon=True, name="stop-deadline").start()

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _in_flow_thread(run: Callable[[], Any]) -> Any:
    """Run the flow in a thread while the main thread keeps the signal handlers: in the main thread
    Prefect swaps in its own SIGTERM handler, which tears the flow down first and waits for the shard
    threads (minutes, on slow model calls) before our stop request could reach them."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = run()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as is
            out["error"] = exc

    thread = threading.Thread(target=target, name="speechpairs-flow", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: signal handlers run in between
    if "error" in out:
        raise out["error"]
    return out["result"]


def _resume_hint(config: Any) -> str:
    """Say "run it again" only when a re-run has finished shards to build on."""
    from tasks.publish import finished_shards

    try:
        done, total = finished_shards(config)
    except Exception:  # noqa: BLE001 - a hint must never hide the error it follows
        return ""
    if done:
        return (f"{done} of {total} shards are finished and kept in staging; run the same command again "
                "to resume from there.")
    return "No shard was finished; fix the cause above before running again."


def _skip_final_gc() -> None:
    """At exit, leave the objects of the ~2,000 modules a run imports (prefect, scipy, pyarrow) to the
    OS instead of garbage-collecting them one by one (a second or more of every run's exit: figures in
    docs/decisions.md). An exit handler, so Prefect's own handlers (flushing logs to the API) still run."""
    import atexit
    import gc

    atexit.register(gc.freeze)


def cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    _skip_final_gc()
    from schemas.config import ConfigError, load_config
    from storage.objectstore import open_store
    from storage.preflight import StorageProblem, check_writable
    from tasks.features.models import ModelLoadError, load_models
    from tasks.ingest import SourceError, iter_refs
    from tasks.instructions import instruction_pool
    from tasks.llm import make_backend
    from tasks.llm.base import LLMUnavailable

    try:
        config = load_config(args.config, args.set or [])
        # Fail before any work on a missing, unknown or empty source (reads one clip reference).
        if next(iter_refs(config.sources), None) is None:
            raise SourceError("the sources list no clips: " + ", ".join(s.path for s in config.sources))
        instruction_pool(config.describe)  # every pool line parsed: a bad tag is a usage error, not quarantines
        check_writable(open_store(config.output.root, config.s3), config.output.dataset)
        make_backend(config.llm).preflight()
        load_models(config.features)  # a missing Whisper/classifier model fails here, naming the setting
    except StorageProblem as exc:
        print(f"speechpairs: output.root: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, SourceError, LLMUnavailable, ModelLoadError) as exc:
        print(f"speechpairs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    quiet_prefect()
    if prefect_api() is None:
        return EXIT_FAILED
    from flows.generate import run_generate
    from storage.lease import RunBusy
    from tasks.commit_gate import CommitRefused
    from tasks.stopping import stop_signal

    links: list[str] = []  # the flow run's UI page, once it exists
    hook, close = _progress_bar(not args.no_progress and sys.stderr.isatty() or args.progress)
    restore_signals = _stop_on_signals()
    try:
        summary = _in_flow_thread(lambda: run_generate(config, hook, on_running=[_announce_flow_run(links)]))
    except CommitRefused as exc:
        print(f"speechpairs: not committed ({exc.kind}): {exc}", file=sys.stderr)
        return EXIT_NOT_COMMITTED
    except RunBusy as exc:
        print(f"speechpairs: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except BaseException as exc:
        signum = stop_signal()
        if signum is None and not isinstance(exc, Exception):
            raise
        close()
        if signum is not None:
            print(f"speechpairs: interrupted ({signal.Signals(signum).name}). {_resume_hint(config)}",
                  file=sys.stderr)
            return 128 + signum
        from storage.preflight import explain

        problem = explain(exc)
        failure = f"storage error: {problem}" if problem else f"{exc.__class__.__name__}: {exc}"
        print(f"speechpairs: run failed: {failure}\n{_resume_hint(config)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        restore_signals()
        close()
    word = "already committed as" if summary.already_committed else "committed"
    print(f"{summary.dataset} {word} {summary.version}")
    print(f"  location:     {summary.location}")
    print(f"  clips in:     {summary.clips_in}")
    if summary.skipped_files:
        from tasks.plan import skipped_text

        print(f"  skipped non-audio files: {skipped_text(summary.skipped_files)}")
    if summary.unentered_folders:
        from tasks.plan import skipped_text

        print(f"  folders not entered: {skipped_text(summary.unentered_folders)} "
              "(quarantined as <dataset>/<folder>/)")
    if summary.recordings_cut:
        print(f"  recordings cut: {summary.recordings_cut} → {summary.segments} segments")
    print(f"  rows written: {summary.rows}")
    reasons = ", ".join(f"{k}={v}" for k, v in summary.quarantine_by_reason.items()) or "none"
    print(f"  quarantined:  {summary.quarantined} ({reasons})")
    print(f"  no transcript: {summary.rows_without_transcript} rows (labels-only seeds)")
    print(f"  audio hours:  {summary.audio_hours:.4f}")
    print(f"  shards:       {summary.shards} ({summary.shards_skipped} reused from an earlier attempt)")
    print(f"  time taken:   {time.perf_counter() - started:.2f} s (flow {summary.seconds:.2f} s)")
    if links:
        print(f"  flow run:     {links[0]}")
    return EXIT_OK


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a generation config and commit a dataset version")
    run.add_argument("config", help="YAML RunConfig, e.g. examples/quickstart.yaml")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a setting, e.g. --set output.root=s3://bucket/prefix (repeatable)")
    add_progress_options(run)
    run.set_defaults(func=cmd_run)
