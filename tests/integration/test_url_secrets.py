"""A password inside a URL setting never reaches stdout, stderr, outputs, staging or the Prefect database:
such a URL is refused before anything starts, with a message that says where the key goes instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.deploy import DeployError, check_parameters
from schemas.config import ConfigError, LLMConfig, S3Config, parse_config
from tests.support.paths import REPO

SECRET = "pa55-w0rd-zq81"


def _prefect_db_bytes() -> bytes:
    """The harness server's SQLite files (database and write-ahead log)."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = str(PREFECT_API_DATABASE_CONNECTION_URL.value())
    path = Path(url.split(":///", 1)[1])
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if p.is_file())


@pytest.mark.parametrize("setting", [
    f"llm.base_url=http://user:{SECRET}@127.0.0.1:9/v1",
    f"llm.base_urls=[http://127.0.0.1:9/v1, http://bob:{SECRET}@127.0.0.1:8/v1]",
    f"s3.endpoint_url=http://key:{SECRET}@127.0.0.1:9",
])
@pytest.mark.usefixtures("prefect_harness")
def test_a_url_with_a_password_is_refused_and_the_password_is_nowhere(
        setting: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["run", str(REPO / "examples" / "quickstart.yaml"), "--no-progress", "--set", f"output.root={tmp_path}/out",
            "--set", setting]
    if setting.startswith("llm."):
        args += ["--set", "llm.backend=openai", "--set", "llm.model=m"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "credentials inside the URL are not accepted" in err
    assert ("SPEECHPAIRS_LLM_API_KEY" if setting.startswith("llm.") else "AWS_SECRET_ACCESS_KEY") in err
    assert SECRET not in out and SECRET not in err
    assert not (tmp_path / "out").exists()  # no output, no staging
    assert not any(SECRET.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert SECRET.encode() not in _prefect_db_bytes()


def test_validation_errors_never_echo_the_url() -> None:
    for build in (lambda: LLMConfig(backend="openai", base_url=f"https://u:{SECRET}@h/v1", model="m"),
                  lambda: S3Config(endpoint_url=f"https://AKIA:{SECRET}@s3.example")):
        with pytest.raises(ValueError) as err:
            build()
        assert SECRET not in str(err.value) and "credentials inside the URL" in str(err.value)
    with pytest.raises(ConfigError) as cerr:
        parse_config({"sources": [{"path": "m.jsonl"}], "llm": {"base_url": f"http://u:{SECRET}@h/v1"}}, environ={})
    assert SECRET not in str(cerr.value)
    # A URL without user-info (and an `@` in the path) is fine.
    assert LLMConfig(backend="openai", base_url="http://h:8000/v1/@x", model="m").base_url == "http://h:8000/v1/@x"


def test_deploy_refuses_a_deployment_whose_config_holds_a_secret(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "prefect.yaml").read_text())
    data["deployments"][0]["parameters"]["config"]["llm"] = {"backend": "openai", "model": "m",
                                                             "base_url": f"http://u:{SECRET}@h/v1"}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(data))
    check_parameters(REPO / "prefect.yaml")  # the shipped deployments are valid
    with pytest.raises(DeployError) as err:
        check_parameters(path)
    assert "sample-nightly" in str(err.value) and SECRET not in str(err.value)
