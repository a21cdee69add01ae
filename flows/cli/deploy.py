"""`speechpairs deploy`: create the work pool and register prefect.yaml's deployments (flows/deploy.py)."""

from __future__ import annotations

import argparse
import sys

from flows.cli.base import EXIT_OK, EXIT_USAGE


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


def add_deploy_parser(sub: argparse._SubParsersAction) -> None:
    dep = sub.add_parser("deploy", help="create the work pool and register prefect.yaml's deployments")
    dep.add_argument("--api-url", help="Prefect API URL (default: PREFECT_API_URL)")
    dep.add_argument("--pool", default="speechpairs-process", help="process work pool (created if missing)")
    dep.add_argument("--name", action="append", help="deploy only this deployment (repeatable)")
    dep.set_defaults(func=cmd_deploy)
