"""`speechpairs calibrate CONFIG --output BINS`: corpus-specific bins from a sample of the sources."""

from __future__ import annotations

import argparse
import sys

from flows.cli.base import EXIT_FAILED, EXIT_OK, EXIT_USAGE, prefect_api, quiet_prefect


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Corpus-specific bins: measure a sample of the config's sources and write a bins file."""
    from pydantic import ValidationError

    from schemas.config import ConfigError, load_config
    from tasks.calibrate import CalibrationError
    from tasks.features.models import ModelLoadError, load_models
    from tasks.ingest import SourceError, iter_refs
    from tasks.instructions import instruction_pool

    quiet_prefect()
    from flows.calibrate import CalibrateParams, run_calibrate

    try:
        params = CalibrateParams(config=load_config(args.config, args.set or []), output=args.output,
                                 max_clips=args.max_clips, min_clips_per_scale=args.min_clips_per_scale)
        # Fail before the flow on a missing or empty source, or a model that cannot load.
        if next(iter_refs(params.config.sources), None) is None:
            raise SourceError("the sources list no clips: " + ", ".join(s.path for s in params.config.sources))
        instruction_pool(params.config.describe)  # the run this calibrates would fail on a bad pool tag
        load_models(params.config.features)
        if prefect_api() is None:
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


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser("calibrate", help="compute corpus-specific bins (equal-share edges) for describe.bins")
    cal.add_argument("config", help="YAML RunConfig whose sources are measured")
    cal.add_argument("--output", required=True, help="bins JSON to write (local path or s3://bucket/key.json)")
    cal.add_argument("--max-clips", type=int, default=2000, help="sample size, chosen by clip-id hash (default 2000)")
    cal.add_argument("--min-clips-per-scale", type=int, default=20,
                     help="a scale with fewer clips keeps the shipped edges (default 20)")
    cal.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting (repeatable)")
    cal.set_defaults(func=cmd_calibrate)
