"""Committed versions for consumer-side tests, built with the real stages (no Prefect needed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from flows.generate import run_plain
from schemas.config import RunConfig, parse_config
from schemas.manifest import Manifest
from storage.reader import DatasetHandle, open_dataset
from tests.support.paths import REPO

SAMPLE = REPO / "examples" / "sample_corpus"


def sample_config(root: str, dataset: str, *, repeat: int = 1, shard_size: int = 4, workdir: Path,
                  overrides: list[str] | None = None, s3_endpoint: str | None = None,
                  s3_region: str | None = None) -> RunConfig:
    """The sample corpus listed `repeat` times (distinct ids, same audio) → a RunConfig."""
    manifest = workdir / f"sample_x{repeat}.jsonl"
    with manifest.open("w") as f:
        for r in range(repeat):
            for line in (SAMPLE / "manifest.jsonl").read_text().splitlines():
                rec = json.loads(line)
                rec["id"] = rec["id"] if repeat == 1 else f"{rec['id']}__r{r:03d}"
                rec["path"] = str(SAMPLE / rec["path"])
                f.write(json.dumps(rec) + "\n")
    extra = list(overrides or [])
    if s3_endpoint:
        extra += [f"s3.endpoint_url={s3_endpoint}", "s3.addressing_style=path"]
    if s3_region:
        extra.append(f"s3.region={s3_region}")
    return parse_config({"sources": [{"path": str(manifest), "dataset": "sample", "language": "en",
                                      "allowed_roots": [str(SAMPLE)]}],  # the manifest lists the sample's files
                         "output": {"root": root, "dataset": dataset, "shard_size": shard_size}},
                        extra, environ={})


def make_version(root: str, dataset: str, *, workdir: Path, repeat: int = 1, shard_size: int = 4,
                 overrides: list[str] | None = None, s3_endpoint: str | None = None,
                 s3_region: str | None = None) -> Manifest:
    """Run the real pipeline on the sample corpus and commit one version under root/dataset."""
    config = sample_config(root, dataset, repeat=repeat, shard_size=shard_size, workdir=workdir,
                           overrides=overrides, s3_endpoint=s3_endpoint, s3_region=s3_region)
    return run_plain(config)


def open_local_version(work: Path, *, repeat: int = 3, shard_size: int = 4) -> DatasetHandle:
    """`make_version` of dataset "demo" under work/root (30 rows in 8 shards by default), opened."""
    manifest = make_version(str(work / "root"), "demo", workdir=work, repeat=repeat, shard_size=shard_size)
    return open_dataset(f"{work}/root/demo", manifest.lineage.version)


def quarantine_rows(root: Path, dataset: str, version: str) -> list[dict]:
    """Every quarantine row of a committed version under a local root, found through its manifest
    (the parts live at data keys outside the version folder since manifest layout 2)."""
    import pyarrow.parquet as pq

    from storage.objectstore import open_store
    from storage.versions import file_key, read_manifest

    manifest = read_manifest(open_store(str(root)), dataset, version)
    return [r for q in manifest.quarantine for r in pq.read_table(Path(root) / file_key(manifest, q)).to_pylist()]


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

        files = self.handle().shard_uris()
        return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)
