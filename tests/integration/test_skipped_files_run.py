"""A folder corpus with non-audio files through `speechpairs run`: the summary, the manifest and the
artifact table name what was skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.corrupt_zoo import mixed_folder
from tests.support.paths import REPO


@pytest.mark.usefixtures("prefect_harness")
def test_run_summary_names_the_skipped_files(tmp_path: Path, sample_corpus: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main
    from flows.generate import run_generate
    from flows.reporting import summary_table
    from schemas.config import load_config
    from storage.objectstore import open_store
    from storage.versions import read_manifest

    folder = mixed_folder(tmp_path / "corpus", sample_corpus)
    quickstart = REPO / "examples" / "quickstart.yaml"
    sets = [f"sources.0.path={folder}", "sources.0.dataset=mixed", f"output.root={tmp_path / 'out'}",
            "output.dataset=mixed"]
    assert main(["run", str(quickstart), *(a for s in sets for a in ("--set", s)), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped non-audio files: 3 (.pdf=2, .docx=1)" in out
    assert "rows written: 2" in out and "quarantined:  0" in out  # the m4a went through ffmpeg to a row
    summary = run_generate(load_config(quickstart, sets, environ={}))  # already committed: same plan
    assert summary.already_committed and summary.skipped_files == {".pdf": 2, ".docx": 1}
    stats = read_manifest(open_store(str(tmp_path / "out")), "mixed", summary.version).stats
    table = summary_table(summary, stats)
    assert {"metric": "skipped non-audio files", "value": "3 (.pdf=2, .docx=1)"} in table
