"""S3 credentials from a Prefect `AwsCredentials` block: the one place storage/ touches Prefect.

Storage is plain Python under the flows; only a named credentials block (`s3.credentials_block`)
needs Prefect's block store, so prefect_aws is imported here, lazily, when one is named.
"""

from __future__ import annotations

from typing import Any, cast


def block_session(name: str) -> Any:
    """The boto3 session of the `AwsCredentials` block saved as `name` (its keys and region)."""
    try:
        from prefect_aws import AwsCredentials
    except ImportError as exc:  # pragma: no cover - prefect-aws is a core dependency
        raise RuntimeError("s3.credentials_block needs the prefect-aws package") from exc
    try:
        block = cast(AwsCredentials, AwsCredentials.load(name))
    except ValueError as exc:
        raise ValueError(f"s3.credentials_block: no AwsCredentials block named {name!r} "
                         "(create it in the Prefect UI or with AwsCredentials(...).save(name))") from exc
    return block.get_boto3_session()
