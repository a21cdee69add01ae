"""Maintenance flows: the janitor that schedules `speechpairs datasets gc` for a list of datasets."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from schemas.config import S3Config
from storage.gc import GcReport, collect_garbage
from storage.objectstore import open_store


@task(name="gc-dataset", task_run_name="gc-{dataset}", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def gc_task(root: str, dataset: str, older_than_hours: float, dry_run: bool, s3: S3Config | None) -> GcReport:
    return collect_garbage(open_store(root, s3), dataset, older_than_hours * 3600, dry_run=dry_run)


@flow(name="gc-datasets", flow_run_name="gc-{root}")
def gc_datasets(root: str, datasets: list[str], older_than_hours: float = 24.0, dry_run: bool = False,
                s3: S3Config | None = None) -> list[GcReport]:
    """Remove abandoned staging runs and uncommitted version prefixes; committed versions never."""
    logger = get_run_logger()
    reports = [gc_task(root, name, older_than_hours, dry_run, s3) for name in datasets]
    rows: list[dict[str, Any]] = [
        {"dataset": r.dataset, "prefixes": len(r.removed), "objects": r.objects_removed,
         "bytes": r.bytes_removed, "kept (too young)": len(r.kept_young),
         "committed versions untouched": len(r.committed_versions), "dry run": r.dry_run}
        for r in reports
    ]
    create_table_artifact(key="gc-summary", table=rows, description=f"gc of {root} older than {older_than_hours} h")
    for r in reports:
        logger.info("%s: %s %d prefixes (%d objects, %d bytes)", r.dataset, "would remove" if dry_run else "removed",
                    len(r.removed), r.objects_removed, r.bytes_removed)
    return reports
