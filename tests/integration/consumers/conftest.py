"""A committed local version for the consumer tests: real stages on the 10-clip sample corpus, 3 shards."""

from __future__ import annotations

import pytest

from tests.support.datasets_support import LocalVersion, make_version
from tests.support.longform import SegmentedVersion, make_segmented_version

DS = "demo"


@pytest.fixture(scope="session")
def local_version(tmp_path_factory: pytest.TempPathFactory) -> LocalVersion:
    """Read-only: demo v0001, 10 rows in shards of 4 (copy it before changing anything)."""
    work = tmp_path_factory.mktemp("consumers")
    manifest = make_version(str(work / "root"), DS, workdir=work)
    assert manifest.stats.rows == 10 and len(manifest.shards) == 3
    return LocalVersion(work / "root", DS, manifest.lineage.version)


@pytest.fixture(scope="session")
def segmented_version(tmp_path_factory: pytest.TempPathFactory) -> SegmentedVersion:
    """Read-only: the segments of one ~40 s recording and one whole clip, committed (one short run)."""
    version = make_segmented_version(tmp_path_factory.mktemp("segmented"))
    assert version.local.handle().manifest.stats.rows >= 4
    return version
