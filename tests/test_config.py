from pathlib import Path

import pytest

from schemas.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_loads_and_resolves_source_paths() -> None:
    config = load_config(REPO / "examples" / "quickstart.yaml", environ={})
    assert Path(config.sources[0].path).is_file()
    assert config.output.root == "./data"
    assert config.llm.backend == "template"


def test_set_overrides_beat_environment_and_coerce_types() -> None:
    env = {"SPEECHPAIRS__OUTPUT__SHARD_SIZE": "7", "SPEECHPAIRS__LLM__TEMPERATURE": "0.3"}
    config = parse_config({"sources": [{"path": "x"}]}, ["llm.temperature=0.9", "describe.attributes=[gender, pitch]"],
                          environ=env)
    assert config.output.shard_size == 7
    assert config.llm.temperature == 0.9
    assert config.describe.attributes == ["gender", "pitch"]


@pytest.mark.parametrize(
    ("data", "override", "needle"),
    [
        ({"sources": [{"path": "x"}], "llm": {"backend": "vllm"}}, [], "llm.backend"),
        ({"sources": [{"path": "x"}], "outptu": {}}, [], "outptu: unknown key"),
        ({"sources": []}, [], "sources"),
        ({"sources": [{"path": "x"}]}, ["describe.attributes=[gender, mood]"], "allowed:"),
        ({"sources": [{"path": "x"}]}, ["audio.min_duration_s=40"], "min_duration_s"),
        ({"sources": [{"path": "x"}]}, ["llm.backend=openai"], "llm.base_url"),
        ({"sources": [{"path": "x"}]}, ["output.dataset=bad name!"], "output.dataset"),
        ({"sources": [{"path": "x"}]}, ["novalue"], "key=value"),
    ],
)
def test_invalid_config_names_the_key(data: dict, override: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, override, environ={})
    assert needle in str(err.value)


def test_literal_error_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [{"path": "x"}], "describe": {"format": "desta3"}}, environ={})
    assert "'desta2' or 'desta25'" in str(err.value)


def test_config_hash_ignores_runner_but_not_content() -> None:
    base = parse_config({"sources": [{"path": "x"}]}, environ={})
    assert base.config_hash() == parse_config({"sources": [{"path": "x"}], "max_workers": 8}, environ={}).config_hash()
    assert base.config_hash() != parse_config({"sources": [{"path": "x"}]}, ["llm.seed=1"], environ={}).config_hash()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path: Path) -> None:
    config = load_config(path, environ={})
    assert config.sources and config.output.dataset
