from pathlib import Path

import pytest

from schemas.config import ConfigError, load_config, parse_config
from tests.support.paths import REPO


def test_quickstart_loads_and_resolves_source_paths() -> None:
    config = load_config(REPO / "examples" / "quickstart.yaml", environ={})
    assert Path(config.sources[0].path).is_file()
    assert config.output.root == "./data"
    assert config.llm.backend == "rules"


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


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"sources": [{"path": "x"}], "outptu": {}}, "outptu: unknown key; did you mean 'output'?"),
        ({"sources": [{"path": "x"}], "llm": {"temprature": 0.1}},
         "llm.temprature: unknown key; did you mean 'temperature'?"),
        ({"sources": [{"path": "x", "alowed_roots": []}]},
         "sources.0.alowed_roots: unknown key; did you mean 'allowed_roots'?"),
        ({"sources": [{"path": "x"}], "features": {"asr": {"modle": "small"}}},
         "features.asr.modle: unknown key; did you mean 'model'?"),
        ({"sources": [{"path": "x", "seed_labels": [{"label": "act", "ass": "Act"}]}]},  # `as` is an alias
         "sources.0.seed_labels.0.ass: unknown key; did you mean 'as'?"),
    ],
)
def test_unknown_key_suggests_close_names_at_its_level(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, environ={})
    assert needle in str(err.value)


def test_unknown_key_without_a_close_name_lists_the_keys_there() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [{"path": "x"}], "s3": {"zzz": 1}}, environ={})
    text = str(err.value)
    assert "s3.zzz: unknown key" in text and "did you mean" not in text
    assert "keys here: endpoint_url, region, addressing_style, credentials_block, max_attempts" in text


def test_invalid_environment_value_names_the_variable_not_its_value() -> None:
    env = {"SPEECHPAIRS__LLM__TEMPERATURE": "5", "SPEECHPAIRS__OUTPUT__SHARD_SIZE": "7"}
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [{"path": "x"}]}, environ=env)
    text = str(err.value)
    assert "llm.temperature (environment: SPEECHPAIRS__LLM__TEMPERATURE=…): Input should be less than or equal to 2" \
        in text
    assert "SHARD_SIZE" not in text  # a valid variable is not blamed
    # The same bad value from --set names --set's key only; --set also wins over the variable.
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [{"path": "x"}]}, ["llm.temperature=7"], environ=env)
    assert "SPEECHPAIRS__" not in str(err.value) and "llm.temperature: Input should be" in str(err.value)
    assert parse_config({"sources": [{"path": "x"}]}, ["llm.temperature=0.2"], environ=env).llm.temperature == 0.2


def test_misspelled_environment_variable_suggests_the_right_variable() -> None:
    env = {"SPEECHPAIRS__LMM__TEMPERATURE": "0.5", "SPEECHPAIRS__LLM__TOP_PP": "0.5"}
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [{"path": "x"}]}, environ=env)
    text = str(err.value)
    assert ("lmm (environment: SPEECHPAIRS__LMM__TEMPERATURE=…): unknown key; did you mean 'llm' "
            "(SPEECHPAIRS__LLM__TEMPERATURE)?") in text
    assert "llm.top_pp (environment: SPEECHPAIRS__LLM__TOP_PP=…): unknown key; did you mean 'top_p' " \
           "(SPEECHPAIRS__LLM__TOP_P)?" in text


def test_environment_secret_values_stay_out_of_errors() -> None:
    env = {"SPEECHPAIRS__S3__ENDPOINT_URL": "http://key:hunter2@127.0.0.1:8333"}
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [{"path": "x"}]}, environ=env)
    assert "s3.endpoint_url (environment: SPEECHPAIRS__S3__ENDPOINT_URL=…): credentials" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_bad_environment_variable_name_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^SPEECHPAIRS__OUTPUT-ROOT: 'output-root' is not a setting name: use "
                                          r"SPEECHPAIRS__<SECTION>__<KEY>"):
        parse_config({"sources": [{"path": "x"}]}, environ={"SPEECHPAIRS__OUTPUT-ROOT": "y"})


def test_relative_paths_resolve_as_the_readme_says(tmp_path: Path) -> None:
    """Source paths against the config file's folder; every other local path against the launch's
    working directory (the flow canonicalises the config with it); the README says which is which."""
    from schemas.canonical import canonical_config

    conf_dir, cwd = tmp_path / "conf", tmp_path / "cwd"
    conf_dir.mkdir()
    cwd.mkdir()
    config_file = conf_dir / "run.yaml"
    config_file.write_text(
        "sources: [{path: corpus.jsonl, allowed_roots: [audio]}]\n"
        "output: {root: out}\n"
        "describe: {bins: bins.json, instruction_pool: pool.txt}\n"
        "llm: {tokenizer: tok}\n"
        "features: {asr: {download_root: cache, model: ./whisper.pt}}\n")
    loaded = load_config(config_file, ["sources.0.language=en"], environ={"SPEECHPAIRS__DESCRIBE__SEED": "3"})
    assert loaded.sources[0].path == str(conf_dir / "corpus.jsonl")
    assert loaded.sources[0].allowed_roots == [str(conf_dir / "audio")]
    assert loaded.output.root == "out" and loaded.describe.bins == "bins.json"  # left for the launch
    run = canonical_config(loaded, cwd)
    assert run.sources[0].path == str(conf_dir / "corpus.jsonl")  # unchanged: already absolute
    assert run.output.root == str(cwd / "out")
    assert (run.describe.bins, run.describe.instruction_pool) == (str(cwd / "bins.json"), str(cwd / "pool.txt"))
    assert run.llm.tokenizer == str(cwd / "tok")
    assert (run.features.asr.download_root, run.features.asr.model) == (str(cwd / "cache"), str(cwd / "whisper.pt"))
    # A source path given with --set is not the file's: it resolves against the working directory.
    override = load_config(config_file, ["sources.0.path=other.jsonl"], environ={})
    assert canonical_config(override, cwd).sources[0].path == str(cwd / "other.jsonl")

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Relative paths.**"):readme.index("| key | default | meaning |")]
    text = " ".join(section.split())
    assert "`sources[].path` and `sources[].allowed_roots` resolve against the config file's folder" in text
    for key in ("output.root", "describe.bins", "describe.instruction_pool", "llm.tokenizer",
                "features.asr.download_root", "features.asr.model"):
        assert f"`{key}`" in text.split("the config file's folder", 1)[1], key
    assert "`--set` or `SPEECHPAIRS__…` (sources too) resolve against the working directory" in text
