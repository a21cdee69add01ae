"""The calibrate flow: sample the corpus → measure → equal-share bins → write the file. It only composes.

A run then uses the file through `describe.bins: <path>`; the bins version (with the file's digest)
lands on every row, so datasets described with different edges never look alike.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from schemas.config import RunConfig
from tasks.calibrate import Calibration, calibrate, comparison_markdown, write_bins


class CalibrateParams(BaseModel):
    """What the UI form and the CLI ask for."""

    config: RunConfig = Field(description="The run config whose sources (and feature settings) are measured.")
    output: str = Field(description="Where to write the bins JSON: a local path or s3://bucket/prefix/file.json.")
    max_clips: int = Field(default=2000, ge=1, description="Sample size (clips chosen by a stable hash of the id).")
    min_clips_per_scale: int = Field(default=20, ge=1, description="Fewer clips than this: keep the shipped scale.")


class CalibrateResult(BaseModel):
    output: str  # where the bins file landed
    calibration: Calibration


# No retries: measuring is deterministic local work, so a failure would only repeat (bad clips never fail it).
@task(name="measure-and-calibrate", cache_policy=NO_CACHE)
def calibrate_task(params: CalibrateParams) -> Calibration:
    return calibrate(params.config, params.max_clips, params.min_clips_per_scale)


@task(name="write-bins", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def write_task(cal: Calibration, params: CalibrateParams) -> str:
    return write_bins(cal.bins, params.output, params.config.s3)


@flow(name="calibrate-bins", flow_run_name="calibrate-{params.config.output.dataset}", validate_parameters=True)
def calibrate_bins(params: CalibrateParams) -> CalibrateResult:
    """Corpus-specific bin edges with the shipped words, written where `output` says."""
    cal = calibrate_task(params)
    output = write_task(cal, params)
    create_markdown_artifact(key="calibrated-bins", markdown=comparison_markdown(cal, output),
                             description=f"{cal.bins.version} from {cal.measured} clips")
    get_run_logger().info("bins %s (%d of %d sampled clips measured) written to %s",
                          cal.bins.version, cal.measured, cal.sampled, output)
    return CalibrateResult(output=output, calibration=cal)


def run_calibrate(params: CalibrateParams) -> CalibrateResult:
    """The flow, for the CLI (a plain call: Prefect records it like any other run)."""
    return calibrate_bins(params)
