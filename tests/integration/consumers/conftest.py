"""A committed local version for the consumer tests: real stages on the 10-clip sample corpus, 3 shards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from storage.reader import DatasetHandle, open_dataset
from tests.datasets_support import make_version

DS = "demo"


@dataclass(frozen=True)
class LocalVersion:
    root: Path
    dataset: str
    version: str

    @property
    def uri(self) -> str:
        return f"{self.root}/{self.dataset}@{self.version}"

    @property
    def version_dir(self) -> Path:
        return self.root / self.dataset / self.version

    def handle(self) -> DatasetHandle:
        return open_dataset(self.uri)

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """The version's rows read straight from its shard files with pyarrow (the reference)."""
        import pyarrow.parquet as pq

        files = [self.version_dir / s.path for s in self.handle().manifest.shards]
        return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)


@pytest.fixture(scope="session")
def local_version(tmp_path_factory: pytest.TempPathFactory) -> LocalVersion:
    """Read-only: demo v0001, 10 rows in shards of 4 (copy it before changing anything)."""
    work = tmp_path_factory.mktemp("consumers")
    manifest = make_version(str(work / "root"), DS, workdir=work)
    assert manifest.stats.rows == 10 and len(manifest.shards) == 3
    return LocalVersion(work / "root", DS, manifest.lineage.version)
