"""`speechpairs datasets …`: list, show, verify, pull, materialize, tag, diff, export, compose and gc committed versions.

Exit 2 for a bad URI, tag name or duration and for a version/ref that does not exist; 1 for a version
that fails verification, a pull, materialize or export that hits a corrupt shard or row (named), a compose whose
sources conflict (duplicate ids, row schemas), or a store that cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flows.cli.base import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_progress_options

if TYPE_CHECKING:
    from schemas.config import S3Config
    from storage.objectstore import ObjectStore


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
    from storage.versions import read_ref, refs_prefix

    by_version: dict[str, list[str]] = {}
    prefix = refs_prefix(dataset)
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
def cmd_datasets_materialize(args: argparse.Namespace) -> int:
    """Self-contained Parquet files of a version (audio joined in) for `datasets`, DuckDB or any reader."""
    from pathlib import Path

    from storage.materialize import MaterializeError, materialize_version
    from storage.versions import read_manifest

    store, dataset, ref = _open(args, args.uri)
    version = _resolve(store, dataset, ref)
    manifest = read_manifest(store, dataset, version)
    try:
        files = materialize_version(store, manifest, Path(args.to), progress=_want_progress(args))
    except MaterializeError as exc:
        print(f"speechpairs: materialize failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for f in files:
        print(f"{'written' if f.written else 'reused '}  {f.path}  rows={f.info.rows:,}  bytes={f.info.bytes:,}")
    print(f"materialized {dataset} {version} in {args.to}: {sum(f.written for f in files)} written, "
          f"{sum(not f.written for f in files)} already there and verified")
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
    print(diff_versions(a, b, read_config(store_a, a), read_config(store_b, b),  # settings changed by name
                        same_root=_where(store_a) == _where(store_b)))
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


def _where(store: ObjectStore) -> str:
    """The store's root as an absolute path or full s3:// URI (two spellings of one root compare equal)."""
    return store.uri("_").removesuffix("_")


@_datasets_command
def cmd_datasets_compose(args: argparse.Namespace) -> int:
    from storage.compose import ComposeError, compose_version, load_part
    from storage.versions import CommitError
    from tasks.run import code_version

    sources = [_open(args, uri) for uri in args.sources]
    store = sources[0][0]
    if "/" in args.name.rstrip("/"):
        target_store, target, _ = _open(args, args.name, with_ref=False)
        if _where(target_store) != _where(store):
            raise _Usage(f"{args.name!r} is not on the root of {args.sources[0]!r}: compose references shards, "
                         "so the target and every source share one root")
    else:
        from storage.versions import check_dataset

        target = check_dataset(args.name)
    for uri, (other, _, _) in zip(args.sources, sources, strict=True):
        if _where(other) != _where(store):
            raise _Usage(f"--from {uri!r} is on another root than {args.sources[0]!r} ({other.root} vs "
                         f"{store.root}): compose references shards, so every source shares the target's root")
    parts = [load_part(store, dataset, ref) for _, dataset, ref in sources]
    try:
        manifest = compose_version(store, target, parts, exclude=args.exclude_dataset, code_version=code_version())
    except (ComposeError, CommitError) as exc:
        print(f"speechpairs: compose failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"composed {target} {manifest.lineage.version} from {', '.join(manifest.lineage.parents)}: "
          f"{len(manifest.shards)} shards, {manifest.stats.rows:,} rows, {manifest.stats.quarantined:,} quarantined "
          f"({store.uri(target)})")
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
          f"{len(report.committed_versions)} committed versions untouched, "
          f"{report.referenced_objects} data objects a committed manifest lists kept"
          + (f", {report.referenced_audio} audio files a version or live run references kept"
             if report.referenced_audio else ""))
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


_URI_HELP = "ROOT/DATASET[@vN|@tag], e.g. ./data/sample@v0002 or s3://bucket/prefix/sample@stable"


def add_datasets_parser(sub: argparse._SubParsersAction) -> None:
    ds = sub.add_parser("datasets", help="inspect, verify, pull, materialize, tag, diff, export, compose and clean "
                                            "datasets")
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
    add_progress_options(p)
    p = add("materialize", cmd_datasets_materialize,
            "write a version's shards as self-contained Parquet files (audio joined in) for datasets/DuckDB")
    p.add_argument("uri", help=_URI_HELP)
    p.add_argument("--to", required=True, metavar="DIR",
                   help="local directory: DIR/<shard sha256>.parquet (a rerun reuses files that still match)")
    add_progress_options(p)
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
    add_progress_options(p)
    g = p.add_argument_group("desta (DeSTA2.5) options")
    g.add_argument("--system", metavar="TEXT", help="system turn (default: a helpful-assistant prompt naming the tags)")
    g.add_argument("--no-system", action="store_true", help="no system turn")
    g.add_argument("--audio-locator", metavar="TOKEN", help="audio placeholder (default <|AUDIO|>)")
    g.add_argument("--audio-start", metavar="TAG", help="text before the locator (default <start_audio>; '' for none)")
    g.add_argument("--audio-end", metavar="TAG", help="text after the locator (default <end_audio>; '' for none)")
    g.add_argument("--audio-position", choices=["after", "before"],
                   help="wrapped locator after (default, as in the trainer's example) or before the instruction")
    p = add("compose", cmd_datasets_compose, "commit a version referencing the shards of existing versions "
                                             "(no copy; duplicate ids fail, naming both sources)")
    p.add_argument("name", help="target DATASET (on the sources' root), or ROOT/DATASET")
    p.add_argument("--from", dest="sources", action="append", required=True, metavar="ROOT/DATASET@REF",
                   help="a source version (repeat); every source on the same root")
    p.add_argument("--exclude-dataset", action="append", default=[], metavar="CORPUS",
                   help="leave out the rows whose `dataset` column is CORPUS (repeat); mixed shards are "
                        "rewritten filtered, once")
    p = add("gc", cmd_datasets_gc, "remove old staging runs, uncommitted version prefixes and data objects no "
                                   "committed manifest lists (--dry-run: what it would free)")
    p.add_argument("uri", help="ROOT/DATASET")
    p.add_argument("--older-than", default="24h", help="minimum age of what is removed (default 24h)")
    p.add_argument("--dry-run", action="store_true", help="report what would be removed; remove nothing")
