"""`speechpairs` command line: run a config; list, show, verify, pull, tag, diff, export and gc datasets.

Exit codes: 0 ok, 2 unusable config or corpus (message names the key/file and the fix), 1 a run
that failed after starting (the staging area keeps finished shards for the re-run), 3 a run that
finished but was not committed (no row, too many quarantined, or a service outage: the message
names the top reasons; staging is kept), 75 another launch of the same run holds its lease
(`output.when_running: wait` queues instead).
`datasets …`: 2 for a bad URI, tag name or duration and for a version/ref that does not exist;
1 for a version that fails verification, a pull or export that hits a corrupt shard or row (named), or
a store that cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.config import S3Config
    from storage.objectstore import ObjectStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_COMMITTED = 0, 1, 2, 3
EXIT_BUSY = 75  # sysexits EX_TEMPFAIL: another launch of the same run is in progress; try again later


def _quiet_prefect() -> None:
    """Console shows the progress bar and the summary; INFO logs (per-shard and commit lines) still go
    to the Prefect API/UI. Only Prefect's console *handler* is raised to WARNING (an override of its
    logging.yml): lowering PREFECT_LOGGING_LEVEL instead would drop the records before the API
    handler sees them. Prefect reads both when it is imported, so this runs before that."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _say(message: str) -> None:
    """A status line on stderr (above the progress bar, if one is drawn)."""
    from tqdm import tqdm

    tqdm.write(f"speechpairs: {message}", file=sys.stderr)
    sys.stderr.flush()


def _prefect_api() -> str | None:
    """Make sure the command has a Prefect API: PREFECT_API_URL if set, else the shared local server
    (flows/local_server.py: started on first use, reused afterwards). None, after saying why, when
    the local server cannot be started."""
    from flows.local_server import ServerError, use_prefect_api

    try:
        return use_prefect_api(_say)
    except ServerError as exc:
        print(f"speechpairs: local Prefect server: {exc}\n(or set PREFECT_API_URL to a running Prefect server)",
              file=sys.stderr)
        return None


def _announce_flow_run(links: list[str]) -> Callable[..., None]:
    """An `on_running` flow hook that prints the run's UI page as soon as the flow run exists."""

    def hook(_flow: Any, flow_run: Any, _state: Any) -> None:
        from flows.local_server import flow_run_url

        url = flow_run_url(flow_run.id)
        if url and not links:
            links.append(url)
            _say(f"flow run {flow_run.name}: {url}")

    return hook


def _patient_temporary_server() -> None:
    """Without PREFECT_API_URL a run starts a temporary Prefect server. On a fresh machine its first
    start creates and migrates the database, which took longer than Prefect's 20 s default here and
    failed the very first `make demo`; 120 s leaves room. Prefect reads its settings once, when it is
    imported, so `main` calls this before anything imports it."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _progress_bar(enabled: bool, clock: Callable[[], float] = time.monotonic
                  ) -> tuple[Callable[[str, int, int], None] | None, Callable[[], None]]:
    """The terminal bar (the tasks.pipeline progress hook): clips done/total, then rows, quarantined,
    rate and ETA. The rate is flows/progress.py's: measured from the first finished batch, so Prefect
    start-up, model loading and planning stay out of it, and so do shards an earlier attempt finished."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    from flows.progress import ProgressMeter

    meter = ProgressMeter(clock=clock)
    bar = tqdm(total=None, unit="clip", desc="clips", dynamic_ncols=True, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    lock = threading.Lock()

    def hook(kind: str, n: int, rows: int) -> None:
        with lock:
            if kind == "total":
                meter.clips_total = n
                bar.total = n
            else:
                meter.add(n, rows, reused=kind == "reused")
                bar.update(n)
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
    from flows.generate import finished_shards

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
    OS instead of garbage-collecting them one by one: 1.0-1.4 s of every run's exit, 0.1 s frozen.
    An exit handler, so Prefect's own handlers (flushing logs to the API) still run."""
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
    _quiet_prefect()
    if _prefect_api() is None:
        return EXIT_FAILED
    from flows.generate import run_generate
    from storage.lease import RunBusy
    from tasks.commit_gate import CommitRefused
    from tasks.pipeline import set_progress_hook
    from tasks.stopping import stop_signal

    links: list[str] = []  # the flow run's UI page, once it exists
    hook, close = _progress_bar(not args.no_progress and sys.stderr.isatty() or args.progress)
    set_progress_hook(hook)
    restore_signals = _stop_on_signals()
    try:
        summary = _in_flow_thread(lambda: run_generate(config, on_running=[_announce_flow_run(links)]))
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
        set_progress_hook(None)
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


# --------------------------------------------------------------------------------------------
# speechpairs datasets …
# --------------------------------------------------------------------------------------------


class _Usage(Exception):
    """A bad URI, duration or tag name, or a version that does not exist: exit 2."""


def _s3(args: argparse.Namespace) -> S3Config:
    """The `s3` block of `--config` (if given), with any --s3-* flag on top; the AWS_* environment
    and defaults fill the rest later, once, in storage/s3.py."""
    from schemas.config import S3Config, load_config

    base = load_config(args.config).s3 if getattr(args, "config", None) else S3Config()
    flags = {"endpoint_url": args.s3_endpoint_url, "region": args.s3_region,
             "addressing_style": args.s3_addressing_style, "credentials_block": args.s3_credentials_block}
    return S3Config.model_validate({**base.model_dump(), **{k: v for k, v in flags.items() if v is not None}})


def _open(args: argparse.Namespace, uri: str, *, with_ref: bool = True) -> tuple[ObjectStore, str, str]:
    """ROOT/DATASET[@REF] → (store, dataset, ref); without `with_ref` an @REF is refused."""
    from storage.objectstore import open_store
    from storage.reader import parse_dataset_uri

    try:
        root, dataset, ref = parse_dataset_uri(uri)
        if not with_ref and "@" in uri.rstrip("/").rpartition("/")[2]:
            raise ValueError(f"{uri!r}: this command takes ROOT/DATASET without @VERSION")
        return open_store(root, _s3(args)), dataset, ref
    except ValueError as exc:
        raise _Usage(str(exc)) from None


def _resolve(store: ObjectStore, dataset: str, ref: str) -> str:
    from storage.versions import resolve_version

    return resolve_version(store, dataset, ref)


def _datasets_command(func: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    """Shared error handling: usage errors and missing versions exit 2, store failures exit 1."""

    def wrapper(args: argparse.Namespace) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        from storage.objectstore import NotFound

        try:
            return int(func(args))
        except (_Usage, NotFound, ValueError) as exc:
            print(f"speechpairs: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except BrokenPipeError:
            raise  # `… | head` closed stdout: not a storage error (main exits quietly)
        except (BotoCoreError, ClientError, OSError) as exc:
            from storage.preflight import explain

            problem = explain(exc)
            print(f"speechpairs: storage error: {problem or f'{exc.__class__.__name__}: {exc}'}", file=sys.stderr)
            return EXIT_FAILED

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


def _want_progress(args: argparse.Namespace) -> bool:
    return bool(args.progress or (not args.no_progress and sys.stderr.isatty()))


@_datasets_command
def cmd_datasets_show(args: argparse.Namespace) -> int:
    from storage.reader import manifest_summary
    from storage.versions import read_config, read_manifest

    store, dataset, ref = _open(args, args.uri)
    manifest = read_manifest(store, dataset, _resolve(store, dataset, ref))
    print(manifest_summary(manifest, read_config(store, manifest)))  # with the recorded run config
    return EXIT_OK


def _tags(store: ObjectStore, dataset: str) -> dict[str, list[str]]:
    """version → names of the refs pointing at it (refs are listed: an admin view)."""
    from storage.versions import read_ref

    by_version: dict[str, list[str]] = {}
    prefix = f"{dataset}/refs/"
    for key in store.list(prefix):
        name = key[len(prefix):]
        if "/" in name or not name.endswith(".json"):
            continue
        try:
            found = read_ref(store, dataset, name[: -len(".json")])
        except ValueError:  # not a valid ref name or not a ref document
            continue
        if found is not None:
            by_version.setdefault(found[0].version, []).append(name[: -len(".json")])
    return {v: sorted(names, key=lambda n: (n != "latest", n)) for v, names in by_version.items()}


@_datasets_command
def cmd_datasets_list(args: argparse.Namespace) -> int:
    from storage.versions import list_versions, read_manifest

    store, dataset, _ = _open(args, args.uri, with_ref=False)
    versions = list_versions(store, dataset)
    if not versions:
        raise _Usage(f"no committed versions of {dataset!r} under {store.root}")
    tags = _tags(store, dataset)
    rows = []
    for version in versions:
        m = read_manifest(store, dataset, version)
        rows.append((version, m.lineage.created_at.strftime("%Y-%m-%d %H:%M:%SZ"), f"{m.stats.rows:,}",
                     f"{m.stats.audio_hours:.4f}", ", ".join(tags.get(version, []))))
    header = ("version", "created (UTC)", "rows", "hours", "tags")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i in (0, 1, 4) else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    dangling = sorted(v for v in tags if v not in versions)
    for v in dangling:
        print(f"warning: {', '.join(tags[v])} point(s) at {v}, which is not committed", file=sys.stderr)
    return EXIT_OK


@_datasets_command
def cmd_datasets_verify(args: argparse.Namespace) -> int:
    from storage.verify import verify_version

    store, dataset, ref = _open(args, args.uri)
    version = _resolve(store, dataset, ref)
    report = verify_version(store, dataset, version, deep=not args.shallow)
    head = (f"{dataset} {version}: {report.shards_checked} shards" + (", config" if report.config_checked else "")
            + f", {report.rows:,} rows"
            + (" (sizes, rows and schemas only)" if args.shallow else ""))
    if report.ok:
        print(f"{head}: OK")
        return EXIT_OK
    print(f"{head}: {len(report.problems)} problem(s)")
    for p in report.problems:
        print(f"  {p.path}: {p.problem}")
    print(f"speechpairs: {dataset}@{version} failed verification: "
          + ", ".join(dict.fromkeys(p.path for p in report.problems)), file=sys.stderr)
    return EXIT_FAILED


@_datasets_command
def cmd_datasets_pull(args: argparse.Namespace) -> int:
    from pathlib import Path

    from storage.pull import PullError, pull_version

    store, dataset, ref = _open(args, args.uri)
    version = _resolve(store, dataset, ref)
    try:
        report = pull_version(store, dataset, version, Path(args.dest), progress=_want_progress(args))
    except PullError as exc:
        print(f"speechpairs: pull failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"pulled {dataset} {version} to {report.dest}: {len(report.downloaded)} downloaded "
          f"({report.bytes_downloaded:,} bytes), {len(report.skipped)} already present and verified")
    return EXIT_OK


@_datasets_command
def cmd_datasets_tag(args: argparse.Namespace) -> int:
    from storage.versions import ref_key, set_ref

    store, dataset, ref = _open(args, args.uri)
    try:
        ref_key(dataset, args.tag)
    except ValueError as exc:
        raise _Usage(f"{exc} (tags: letters, digits, '.', '_', '-'; not a version name like v0001)") from None
    version = _resolve(store, dataset, ref)
    set_ref(store, dataset, version, args.tag, only_forward=False)
    print(f"{dataset}@{args.tag} → {version}")
    return EXIT_OK


@_datasets_command
def cmd_datasets_diff(args: argparse.Namespace) -> int:
    from storage.diff import diff_versions
    from storage.versions import read_config, read_manifest

    store_a, dataset_a, ref_a = _open(args, args.uri_a)
    if "/" not in args.uri_b:  # "v0002" or "@v0002": same root and dataset as A
        store_b, dataset_b, ref_b = store_a, dataset_a, args.uri_b.lstrip("@")
    else:
        store_b, dataset_b, ref_b = _open(args, args.uri_b)
    a = read_manifest(store_a, dataset_a, _resolve(store_a, dataset_a, ref_a))
    b = read_manifest(store_b, dataset_b, _resolve(store_b, dataset_b, ref_b))
    print(diff_versions(a, b, read_config(store_a, a), read_config(store_b, b)))  # settings changed by name
    return EXIT_OK


@_datasets_command
def cmd_datasets_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pydantic import ValidationError

    from storage.export import Desta25Options, ExportError, export_desta, export_desta2

    desta_flags = {"system": args.system, "include_system": False if args.no_system else None,
                   "audio_locator": args.audio_locator, "audio_start": args.audio_start,
                   "audio_end": args.audio_end, "audio_position": args.audio_position}
    given = {k: v for k, v in desta_flags.items() if v is not None}
    if args.format != "desta" and given:
        raise _Usage("--system, --no-system and --audio-* apply to the desta format only")
    if args.no_system and args.system is not None:
        raise _Usage("give --system TEXT or --no-system, not both")
    try:
        options = Desta25Options(**given)
    except ValidationError as exc:
        raise _Usage("; ".join(e["msg"] for e in exc.errors())) from None
    store, dataset, ref = _open(args, args.uri)
    version = _resolve(store, dataset, ref)
    dest, progress = Path(args.dest), _want_progress(args)
    try:
        if args.format == "desta":
            report = export_desta(store, dataset, version, dest, options, jsonl_name=args.jsonl, progress=progress)
        else:
            report = export_desta2(store, dataset, version, dest, jsonl_name=args.jsonl, progress=progress)
    except ExportError as exc:
        print(f"speechpairs: export failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"exported {dataset} {version} ({report.format}) to {report.dest}: {report.rows:,} rows in "
          f"{report.jsonl} ({report.jsonl_bytes:,} bytes), {report.audio_files:,} audio files "
          f"({report.audio_bytes:,} bytes; {report.audio_written:,} written, {report.audio_skipped:,} already "
          "there and verified)")
    return EXIT_OK


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90s', '30m', '24h', '7d', '1w' or plain seconds → seconds."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise _Usage(f"invalid duration {text!r}: use e.g. 90s, 30m, 24h, 7d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


@_datasets_command
def cmd_datasets_gc(args: argparse.Namespace) -> int:
    from storage.gc import collect_garbage

    store, dataset, _ = _open(args, args.uri, with_ref=False)
    older = parse_duration(args.older_than)
    report = collect_garbage(store, dataset, older, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for p in report.removed:
        print(f"{verb} {p.kind} {p.prefix} ({p.objects} objects, {p.bytes:,} bytes, "
              f"{p.age_s / 3600:.1f} h old)")
    print(f"{dataset}: {verb} {len(report.removed)} prefixes ({report.objects_removed} objects, "
          f"{report.bytes_removed:,} bytes); {len(report.kept_young)} younger than {args.older_than} kept; "
          f"{len(report.committed_versions)} committed versions untouched")
    return EXIT_OK


def _add_s3_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="CONFIG",
                        help="YAML run config whose `s3` block reaches the store (--s3-* flags override it)")
    parser.add_argument("--s3-endpoint-url",
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS)")
    parser.add_argument("--s3-region", help="S3 region (default: AWS_REGION, AWS_DEFAULT_REGION, us-east-1)")
    parser.add_argument("--s3-addressing-style", choices=["auto", "path", "virtual"],
                        help="S3 bucket addressing (default auto: path for a custom endpoint, else virtual)")
    parser.add_argument("--s3-credentials-block", metavar="NAME",
                        help="Prefect AwsCredentials block to take credentials from (else AWS_* / boto3 chain)")


def _add_progress_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")


_URI_HELP = "ROOT/DATASET[@vN|@tag], e.g. ./data/sample@v0002 or s3://bucket/prefix/sample@stable"


def _add_datasets_parsers(sub: argparse._SubParsersAction) -> None:
    dep = sub.add_parser("deploy", help="create the work pool and register prefect.yaml's deployments")
    dep.add_argument("--api-url", help="Prefect API URL (default: PREFECT_API_URL)")
    dep.add_argument("--pool", default="speechpairs-process", help="process work pool (created if missing)")
    dep.add_argument("--name", action="append", help="deploy only this deployment (repeatable)")
    dep.set_defaults(func=cmd_deploy)
    ds = sub.add_parser("datasets", help="inspect, verify, pull, tag, diff, export and clean datasets")
    ds_sub = ds.add_subparsers(dest="datasets_command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = ds_sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        _add_s3_options(p)
        return p

    p = add("list", cmd_datasets_list, "list committed versions with created time, rows, hours and tags")
    p.add_argument("uri", help="ROOT/DATASET, e.g. ./data/sample or s3://bucket/prefix/sample")
    p = add("show", cmd_datasets_show, "print a version's manifest summary and its recorded run config")
    p.add_argument("uri", help=_URI_HELP)
    p = add("verify", cmd_datasets_verify, "check every shard against the manifest (exit 1 on a problem)")
    p.add_argument("uri", help=_URI_HELP)
    p.add_argument("--shallow", action="store_true", help="sizes, row counts and schemas only (no sha256)")
    p = add("pull", cmd_datasets_pull, "download a version (resumable, checksum-verified)")
    p.add_argument("uri", help=_URI_HELP)
    p.add_argument("dest", help="local directory")
    _add_progress_options(p)
    p = add("tag", cmd_datasets_tag, "point a named tag (e.g. stable) at a version")
    p.add_argument("uri", help=_URI_HELP)
    p.add_argument("tag", help="tag name, e.g. stable or exp-lr3")
    p = add("diff", cmd_datasets_diff, "rows, hours, quarantine, attribute and lineage changes between versions")
    p.add_argument("uri_a", help=_URI_HELP)
    p.add_argument("uri_b", help=_URI_HELP + "; or just vN / tag for the same dataset")
    p = add("export", cmd_datasets_export, "export a version for a trainer: JSONL + audio files (resumable)")
    p.add_argument("format", choices=["desta", "desta2"],
                   help="desta: DeSTA2.5-Audio trainer (messages + response); desta2: DeSTA2 NeMo recipe "
                        "(audio_filepath, duration, transcription, input, target)")
    p.add_argument("uri", help=_URI_HELP)
    p.add_argument("dest", help="local directory (the trainer's data root)")
    p.add_argument("--jsonl", metavar="NAME", help="JSONL file name in DEST (default DATASET.jsonl for desta, "
                                                    "DATASET.desta2.jsonl for desta2)")
    _add_progress_options(p)
    g = p.add_argument_group("desta (DeSTA2.5) options")
    g.add_argument("--system", metavar="TEXT", help="system turn (default: a helpful-assistant prompt naming the tags)")
    g.add_argument("--no-system", action="store_true", help="no system turn")
    g.add_argument("--audio-locator", metavar="TOKEN", help="audio placeholder (default <|AUDIO|>)")
    g.add_argument("--audio-start", metavar="TAG", help="text before the locator (default <start_audio>; '' for none)")
    g.add_argument("--audio-end", metavar="TAG", help="text after the locator (default <end_audio>; '' for none)")
    g.add_argument("--audio-position", choices=["after", "before"],
                   help="wrapped locator after (default, as in the trainer's example) or before the instruction")
    p = add("gc", cmd_datasets_gc, "remove old staging runs and uncommitted version prefixes")
    p.add_argument("uri", help="ROOT/DATASET")
    p.add_argument("--older-than", default="24h", help="minimum age of what is removed (default 24h)")
    p.add_argument("--dry-run", action="store_true", help="report what would be removed; remove nothing")


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import DeployError, deploy

    try:
        names = deploy(api_url=args.api_url, pool=args.pool, names=args.name or None)
    except DeployError as exc:
        print(f"speechpairs: deploy failed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for name in names:
        print(f"deployed {name}")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Corpus-specific bins: measure a sample of the config's sources and write a bins file."""
    from pydantic import ValidationError

    from schemas.config import ConfigError, load_config
    from tasks.calibrate import CalibrationError
    from tasks.features.models import ModelLoadError, load_models
    from tasks.ingest import SourceError, iter_refs
    from tasks.instructions import instruction_pool

    _quiet_prefect()
    from flows.calibrate import CalibrateParams, run_calibrate

    try:
        params = CalibrateParams(config=load_config(args.config, args.set or []), output=args.output,
                                 max_clips=args.max_clips, min_clips_per_scale=args.min_clips_per_scale)
        # Fail before the flow on a missing or empty source, or a model that cannot load.
        if next(iter_refs(params.config.sources), None) is None:
            raise SourceError("the sources list no clips: " + ", ".join(s.path for s in params.config.sources))
        instruction_pool(params.config.describe)  # the run this calibrates would fail on a bad pool tag
        load_models(params.config.features)
        if _prefect_api() is None:
            return EXIT_FAILED
        result = run_calibrate(params)
    except (ConfigError, SourceError, ModelLoadError, CalibrationError, ValidationError) as exc:
        print(f"speechpairs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not dump a traceback at users
        print(f"speechpairs: calibration failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    cal = result.calibration
    skipped = ", ".join(f"{k}={v}" for k, v in cal.skipped.items()) or "none"
    print(f"calibrated bins {cal.bins.version} written to {result.output}")
    print(f"  sample:   {cal.sampled} of {cal.corpus_clips} clips, {cal.measured} measured (skipped: {skipped})")
    for r in cal.scales:
        edges = ", ".join(f"{e:g}" for e in r.edges)
        print(f"  {r.name:<15} {r.clips:>6} clips  [{edges}]" + ("" if r.calibrated else f"  {r.detail}"))
    if result.output.startswith("s3://"):
        print("describe.bins reads a local file: copy it next to the config, then set `describe.bins: <path>`.")
    else:
        print(f"Use it in a run: set `describe.bins: {result.output}` in the config "
              f"(or --set describe.bins={result.output}).")
    return EXIT_OK


def _add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser("calibrate", help="compute corpus-specific bins (equal-share edges) for describe.bins")
    cal.add_argument("config", help="YAML RunConfig whose sources are measured")
    cal.add_argument("--output", required=True, help="bins JSON to write (local path or s3://bucket/key.json)")
    cal.add_argument("--max-clips", type=int, default=2000, help="sample size, chosen by clip-id hash (default 2000)")
    cal.add_argument("--min-clips-per-scale", type=int, default=20,
                     help="a scale with fewer clips keeps the shipped edges (default 20)")
    cal.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting (repeatable)")
    cal.set_defaults(func=cmd_calibrate)


def cmd_server(args: argparse.Namespace) -> int:
    """`server start|stop|status`: the local Prefect server runs use without PREFECT_API_URL.
    Exit 0; `status` exits 1 when no server is running, `start` when it cannot start one."""
    from flows import local_server as local

    explicit = os.environ.get("PREFECT_API_URL")
    note = f"note: PREFECT_API_URL is set ({explicit}): runs use that server, not this one" if explicit else None
    if args.server_command == "stop":
        stopped = local.stop_server(_say)
        print(f"stopped the local Prefect server (PID {stopped.pid}, {stopped.url})" if stopped
              else f"no local Prefect server recorded in {local.server_dir()}")
        return EXIT_OK
    if args.server_command == "start":
        try:
            local.ensure_server(_say)
        except local.ServerError as exc:
            print(f"speechpairs: local Prefect server: {exc}", file=sys.stderr)
            return EXIT_FAILED
    record, state = local.server_status()
    print(f"local Prefect server: {state}")
    if record is not None:
        print(f"  URL:          {record.url} (API {record.api_url})\n  PID:          {record.pid}\n"
              f"  version:      prefect {record.prefect_version}")
    print(f"  data folder:  {local.server_dir()}\n  log:          {local.log_path()}")
    if note:
        print(note)
    return EXIT_OK if state == "running" else EXIT_FAILED


def _add_server_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("server", help="start, stop or inspect the local Prefect server runs use by default")
    srv.add_argument("server_command", choices=["start", "stop", "status"],
                     help="start: start it unless running (prints where); stop: end its process group; "
                          "status: URL, PID, version, data folder")
    srv.set_defaults(func=cmd_server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechpairs", description="Self-generated speech-text pairs.")
    parser.add_argument("--version", action=_VersionAction, help="print the version (and git commit) and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a generation config and commit a dataset version")
    run.add_argument("config", help="YAML RunConfig, e.g. examples/quickstart.yaml")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a setting, e.g. --set output.root=s3://bucket/prefix (repeatable)")
    _add_progress_options(run)
    run.set_defaults(func=cmd_run)
    _add_datasets_parsers(sub)
    _add_calibrate_parser(sub)
    _add_server_parser(sub)
    return parser


def _telemetry_off() -> None:
    """No usage data leaves the machine unless the user opts in: DO_NOT_TRACK is the standard switch
    (Prefect's client honours it), PREFECT_SERVER_ANALYTICS_ENABLED the server's. A value the user
    set wins. Prefect reads its settings when imported, so `main` calls this first."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _version() -> str:
    """`speechpairs --version`: the package version, plus `+g<commit>` in a git checkout, spelled as
    flows/generate.py's code_version() records it in every manifest (a test keeps the two equal);
    not imported from there, since importing the flow (and Prefect) takes seconds."""
    import subprocess
    from importlib import metadata
    from pathlib import Path

    version = metadata.version("speechpairs")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{sha}" if sha else version


class _VersionAction(argparse.Action):
    """Like argparse's `version` action, computed only when asked for (it runs git)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        print(f"speechpairs {_version()}")
        parser.exit()


def main(argv: Sequence[str] | None = None) -> int:
    _patient_temporary_server()
    _telemetry_off()
    try:
        try:
            args = build_parser().parse_args(argv)
            code = int(args.func(args))
        finally:
            sys.stdout.flush()  # a reader that left (`speechpairs … | head`) shows here, where it is handled
    except BrokenPipeError:
        # The reader has what it wanted: exit quietly, as a shell tool killed by SIGPIPE does, and keep
        # the interpreter's final flush from printing a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
