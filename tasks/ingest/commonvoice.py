"""Mozilla Common Voice (`prepare_commonvoice`): one locale folder of a `cv-corpus-*` release.

Layout: `<locale>/clips/*.mp3` and tab-separated `validated.tsv`, `train.tsv`, `dev.tsv`, `test.tsv`
(columns client_id, path, sentence, up_votes, down_votes, age, gender, accent or accents, locale,
segment, and in newer releases sentence_id, sentence_domain, variant). The source path is the
locale folder (reads `validated.tsv`, else train+dev+test) or one of its .tsv files, local or
`s3://` (TSVs read by range requests, clips never listed). The TSVs are
unquoted (QUOTE_NONE), one row a line, so a row is located again by its byte offset.

Labels, verbatim: speaker (client_id), gender, age, accent, and every other non-empty column.
No seed labels by default: accent, age and gender (what DeSTA2.5's Common Voice seeds carry) are
canonical attributes; the other columns are votes and bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from schemas.records import Clip, ReasonCode
from tasks.ingest.common import (
    ClipRef,
    CorpusPath,
    SourceError,
    label_dict,
    make_id,
    one_line,
    path_of,
    read_line,
    too_long_line,
)
from tasks.ingest.files import FileKey, metadata_key, open_source
from tasks.ingest.paths import Rejected, Roots, prepare

DEFAULT_TSVS = ("validated.tsv",)
FALLBACK_TSVS = ("train.tsv", "dev.tsv", "test.tsv")
RENAMED = {"client_id": "speaker", "accents": "accent"}
NOT_LABELS = {"path", "sentence"}
ROW_BUFFER = 1 << 16  # one row (or the header) re-read: a 64 KiB range request on s3://, not 1 MiB
TSV_FIX = ("point sources[].path at a Common Voice locale folder (cv-corpus-*/<locale>/) holding clips/ and "
           "validated.tsv, or at one of its .tsv files")


def tsv_files(path: CorpusPath) -> tuple[CorpusPath, list[str]]:
    """(locale folder, TSV names in it) for a folder or a single TSV source."""
    if path.is_file():
        return path.parent, [path.name]
    for names in (DEFAULT_TSVS, FALLBACK_TSVS):
        found = [n for n in names if (path / n).is_file()]
        if found:
            return path, found
    raise SourceError(f"{path / 'validated.tsv'}: missing Common Voice index (nor train.tsv/dev.tsv/test.tsv); "
                      + TSV_FIX)


@lru_cache(maxsize=8)
def _header(key: FileKey) -> tuple[list[str], int]:
    """(column names, byte offset of the first row)."""
    with open_source(path_of(key[0]), buffer_size=ROW_BUFFER) as f:
        line, size = read_line(f)
        if size and not line:
            raise SourceError(f"{key[0]} line 1 (the header): {too_long_line(size)}")
        columns = [c.strip() for c in line.decode("utf-8-sig").rstrip("\r\n").split("\t")]
        return columns, f.tell()


def _columns(tsv: CorpusPath) -> tuple[FileKey, list[str], int]:
    key = metadata_key(tsv, "Common Voice index", TSV_FIX)
    columns, start = _header(key)
    if "path" not in columns:
        raise SourceError(f"{tsv}: no `path` column (columns: {columns}); {TSV_FIX}")
    return key, columns, start


def _fields(line: bytes) -> list[str]:
    return line.decode("utf-8", errors="replace").rstrip("\r\n").split("\t")


def _local_id(path_value: str) -> str:
    name = path_value.strip().replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def iter_commonvoice_refs(root: CorpusPath, source_index: int, dataset: str, *,
                          roots: Roots | None = None) -> Iterator[ClipRef]:
    base, names = tsv_files(root)
    if not (base / "clips").is_dir():
        raise SourceError(f"{base / 'clips'}: missing Common Voice audio folder; " + TSV_FIX)
    for name in names:
        columns, rows = _rows(base / name)
        i_path = columns.index("path")
        for offset, line in rows:
            if line.strip() or not line:  # an over-long line is a ref too: its load reports it
                fields = _fields(line)
                local = _local_id(fields[i_path]) if len(fields) > i_path and fields[i_path].strip() else None
                yield ClipRef(id=make_id(dataset, local or f"{name}@{offset}"), source=source_index,
                              locator=f"{name}:{offset}")


def _rows(tsv: CorpusPath) -> tuple[list[str], Iterator[tuple[int, bytes]]]:
    """The TSV's columns, and its rows as (byte offset, raw line) in one sequential read (b"" for an over-long line)."""
    _, columns, start = _columns(tsv)

    def rows() -> Iterator[tuple[int, bytes]]:
        with open_source(tsv) as f:
            f.seek(start)
            offset = start
            while True:
                line, size = read_line(f)
                if not size:
                    return
                yield offset, line
                offset += size

    return columns, rows()


def load_commonvoice_clip(root: CorpusPath, locator: str, *, clip_id: str, dataset: str, language: str | None,
                          extra_labels: dict[str, str], roots: Roots | None = None) -> Clip:
    base = root.parent if root.is_file() else root
    name, _, off = locator.rpartition(":")
    tsv = base / name
    _, columns, _ = _columns(tsv)
    offset = int(off)
    where = f"{tsv} at byte {offset}"
    with open_source(tsv, buffer_size=ROW_BUFFER) as f:
        f.seek(offset)
        line, size = read_line(f)
    if size and not line:
        msg = f"{where}: {too_long_line(size)}"
        return Clip(id=clip_id, dataset=dataset, audio_uri=where, ingest_error=(ReasonCode.bad_row, msg))
    fields = _fields(line)
    if len(fields) != len(columns):
        msg = f"{where}: row has {len(fields)} fields, header has {len(columns)}; fix or remove the row"
        return Clip(id=clip_id, dataset=dataset, audio_uri=where, ingest_error=(ReasonCode.bad_row, msg))
    row = dict(zip(columns, fields, strict=True))
    audio = row["path"].strip()
    if not audio:
        msg = f"{where}: empty `path`; every row needs the clip's file name in clips/"
        return Clip(id=clip_id, dataset=dataset, audio_uri=where, ingest_error=(ReasonCode.bad_row, msg))
    real = (roots or Roots.of(base)).check(str(base / "clips" / audio), where)
    if isinstance(real, Rejected):
        return real.clip(clip_id, dataset, where)
    labels = label_dict(extra_labels, [(RENAMED.get(k, k), v) for k, v in row.items() if k not in NOT_LABELS])
    return Clip(id=clip_id, dataset=dataset, audio_uri=real,
                transcript=one_line(row.get("sentence")), language=(row.get("locale") or "").strip() or language,
                labels=labels)


def audio_paths(root: CorpusPath, locators: Iterable[str]) -> Iterator[tuple[str, CorpusPath]]:
    """(locator, clips/<path>) of each of `locators` (rows of the index), from one sequential read of
    each TSV they name: planning weighs those files without re-reading a row per clip."""
    base = root.parent if root.is_file() else root
    wanted: dict[str, set[int]] = {}
    for locator in locators:
        name, _, off = locator.rpartition(":")
        if off.isdigit():
            wanted.setdefault(name, set()).add(int(off))
    for name in sorted(wanted):
        columns, rows = _rows(base / name)
        i_path = columns.index("path")
        for offset, line in rows:
            fields = _fields(line) if offset in wanted[name] else []
            if len(fields) == len(columns) and fields[i_path].strip():
                yield f"{name}:{offset}", base / "clips" / fields[i_path].strip()


def prepare_commonvoice(path: str | Path, dataset: str = "commonvoice", allowed_roots: Iterable[str] = ()) -> Iterator[Clip]:
    """Every clip of the corpus at `path`, lazily (what a run ingests, without planning or shards);
    audio is read below `path` and `allowed_roots` only."""
    return prepare(iter_commonvoice_refs, load_commonvoice_clip, Path(path), dataset, allowed_roots)
