"""A malformed instruction pool fails the run before any clip: the CLI, calibrate and the flow's start
check every line, and the message names the file, the line and the tag."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.config import ConfigError, DescribeConfig, load_config
from tasks.instructions import InstructionPoolError, instruction_pool, load_instruction_pool
from tests.support.paths import REPO

QUICKSTART = str(REPO / "examples" / "quickstart.yaml")
POOL = "# a pool with one bad line\nDescribe the speaker.\n\n[words<=20] In a few words, who speaks?\n[jsn] Bad tag.\n"


def _bad_pool(tmp_path: Path) -> Path:
    path = tmp_path / "pool.txt"
    path.write_text(POOL, encoding="utf-8")
    return path


def test_a_bad_pool_line_is_named_by_file_line_and_tag(tmp_path: Path) -> None:
    path = _bad_pool(tmp_path)
    with pytest.raises(InstructionPoolError) as caught:
        load_instruction_pool(str(path))
    message = str(caught.value)
    assert str(path) in message and "line 5" in message and "[jsn]" in message
    assert isinstance(caught.value, ConfigError)  # every pre-flight reports it as a usage error
    with pytest.raises(InstructionPoolError, match="no file at"):
        load_instruction_pool(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# only comments\n\n", encoding="utf-8")
    with pytest.raises(InstructionPoolError, match="has no instructions"):
        load_instruction_pool(str(tmp_path / "empty.txt"))


def test_the_single_configured_instruction_is_checked_too() -> None:
    with pytest.raises(InstructionPoolError, match=r"(?s)describe\.instruction .*\[bullets\]"):
        instruction_pool(DescribeConfig(instruction="[bullets] Three points."))
    assert instruction_pool(DescribeConfig(instruction="[bullets=3] Three points.")) == ("[bullets=3] Three points.",)


def test_cli_run_and_calibrate_refuse_a_bad_pool_before_any_work(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    path = _bad_pool(tmp_path)
    out = tmp_path / "out"
    overrides = ["--set", f"describe.instruction_pool={path}", "--set", f"output.root={out}"]
    assert main(["run", QUICKSTART, *overrides]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 5" in err and "[jsn]" in err
    assert not out.exists()  # no staging area, not even the write probe
    bins = tmp_path / "bins.json"
    assert main(["calibrate", QUICKSTART, "--output", str(bins), *overrides]) == 2
    assert "line 5" in capsys.readouterr().err and not bins.exists()


def test_the_flow_start_refuses_a_bad_pool_before_any_staging(tmp_path: Path) -> None:
    from flows.generate import run_plain

    out = tmp_path / "out"
    config = load_config(QUICKSTART, [f"describe.instruction_pool={_bad_pool(tmp_path)}", f"output.root={out}"],
                         environ={})
    with pytest.raises(InstructionPoolError, match="line 5"):
        run_plain(config)
    assert not (out / "sample" / "_staging").exists()
