"""`speechpairs` command line: run a config, inspect datasets.

Exit codes: 0 ok, 2 unusable config or corpus (message names the key/file and the fix), 1 a run
that failed after starting (the staging area keeps finished shards for the re-run).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _quiet_prefect() -> None:
    """Console shows the progress bar and the summary; full logs still go to the Prefect API/UI."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _progress_bar(enabled: bool):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=None, unit="clip", desc="clips", dynamic_ncols=True, file=sys.stderr)
    lock = threading.Lock()

    def hook(kind: str, n: int) -> None:
        with lock:
            if kind == "total":
                bar.total = n
                bar.refresh()
            else:
                bar.update(n)

    return hook, bar.close


def cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from schemas.config import ConfigError, load_config
    from tasks.ingest import SourceError, iter_refs
    from tasks.llm import make_backend
    from tasks.llm.openai_compat import LLMUnavailable

    try:
        config = load_config(args.config, args.set or [])
        # Fail before any work on a missing, unknown or empty source (reads one clip reference).
        if next(iter_refs(config.sources), None) is None:
            raise SourceError("the sources list no clips: " + ", ".join(s.path for s in config.sources))
        make_backend(config.llm).preflight()
    except (ConfigError, SourceError, LLMUnavailable) as exc:
        print(f"speechpairs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _quiet_prefect()
    from flows.generate import run_generate
    from tasks.pipeline import set_progress_hook

    hook, close = _progress_bar(not args.no_progress and sys.stderr.isatty() or args.progress)
    set_progress_hook(hook)
    try:
        summary = run_generate(config)
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not dump a traceback at users
        print(f"speechpairs: run failed: {exc.__class__.__name__}: {exc}\n"
              "Finished shards are kept in staging; run the same command again to resume.", file=sys.stderr)
        return EXIT_FAILED
    finally:
        set_progress_hook(None)
        close()
    word = "already committed as" if summary.already_committed else "committed"
    print(f"{summary.dataset} {word} {summary.version}")
    print(f"  location:     {summary.location}")
    print(f"  clips in:     {summary.clips_in}")
    print(f"  rows written: {summary.rows}")
    reasons = ", ".join(f"{k}={v}" for k, v in summary.quarantine_by_reason.items()) or "none"
    print(f"  quarantined:  {summary.quarantined} ({reasons})")
    print(f"  audio hours:  {summary.audio_hours:.4f}")
    print(f"  shards:       {summary.shards} ({summary.shards_skipped} reused from an earlier attempt)")
    print(f"  time taken:   {time.perf_counter() - started:.2f} s (flow {summary.seconds:.2f} s)")
    return EXIT_OK


def cmd_datasets_show(args: argparse.Namespace) -> int:
    from schemas.config import S3Config
    from storage.objectstore import NotFound
    from storage.reader import manifest_summary, open_manifest

    s3 = S3Config(endpoint_url=args.s3_endpoint_url, region=args.s3_region)
    try:
        manifest = open_manifest(args.uri, s3)
    except (NotFound, FileNotFoundError, ValueError) as exc:
        print(f"speechpairs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(manifest_summary(manifest))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechpairs", description="Self-generated speech-text pairs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a generation config and commit a dataset version")
    run.add_argument("config", help="YAML RunConfig, e.g. examples/quickstart.yaml")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a setting, e.g. --set output.root=s3://bucket/prefix (repeatable)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")
    run.set_defaults(func=cmd_run)
    ds = sub.add_parser("datasets", help="inspect committed datasets")
    ds_sub = ds.add_subparsers(dest="datasets_command", required=True)
    show = ds_sub.add_parser("show", help="print a version's manifest summary")
    show.add_argument("uri", help="ROOT/DATASET[@vN|@tag], e.g. ./data/sample or s3://bucket/prefix/sample@v0002")
    show.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (credentials from AWS_* variables)")
    show.add_argument("--s3-region", help="S3 region")
    show.set_defaults(func=cmd_datasets_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
