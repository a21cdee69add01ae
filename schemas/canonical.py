"""The canonical form of a run config: one spelling per run, whoever launched it.

The CLI resolves a config file's relative source paths against the file's folder; a deployment
hands the flow prefect.yaml's parameters as written, relative to the project directory (the
worker's working directory). Both must name the same run (run id, staging area, lease), or the
second launch commits a duplicate version. So the flow canonicalises the config once, at its
start, and both runs with and hashes the result: local paths absolute against `base` (links
resolved, as `load_config` does), every default filled in (validation fills them).

Also here: the config as recorded next to a version (`config_record`), with anything that looks
like a credential redacted. The config model already refuses `user:password@` in URLs and keys
come from the environment; redaction is the second line of defence for free-form values
(corpus labels, system prompts) into which someone pasted a key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from schemas.config import RunConfig

REDACTED = "***"

# Fields that always hold a local path or a URI.
_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "output": ("root",),
    "describe": ("bins", "instruction_pool"),
    "llm": ("tokenizer",),
}
# Fields holding a model id *or* a local path: only an explicit relative path (./x, ../x) is a path,
# since `org/name` is a hub id.
_MODEL_FIELDS: dict[str, tuple[str, ...]] = {"llm": ("model",)}


def resolve_local(value: str, base: Path) -> str:
    """An absolute, link-resolved local path; URIs (s3://, http://) and unusable text stay as given."""
    if "://" in value or "\0" in value or not value.strip():
        return value
    return str((base / value).resolve())


def _explicit_relative(value: str) -> bool:
    return value in (".", "..") or value.startswith(("./", "../"))


def canonical_config(config: RunConfig, base: Path) -> RunConfig:
    """`config` with every local path absolute against `base` (the launch's working directory);
    idempotent, and the identity for a config whose paths are already absolute and resolved."""
    data = config.model_dump(mode="json")
    for source in data["sources"]:
        source["path"] = resolve_local(source["path"], base)
        source["allowed_roots"] = [resolve_local(r, base) for r in source["allowed_roots"]]
    for section, keys in _PATH_FIELDS.items():
        for key in keys:
            if isinstance(data[section].get(key), str):
                data[section][key] = resolve_local(data[section][key], base)
    asr = data["features"]["asr"]
    if isinstance(asr.get("download_root"), str):
        asr["download_root"] = resolve_local(asr["download_root"], base)
    if _explicit_relative(asr["model"]) or asr["model"].endswith(".pt"):  # Whisper names have neither
        asr["model"] = resolve_local(asr["model"], base)
    for classifier in data["features"]["classifiers"]:
        if _explicit_relative(classifier["model"]):
            classifier["model"] = resolve_local(classifier["model"], base)
    for section, keys in _MODEL_FIELDS.items():
        for key in keys:
            value = data[section].get(key)
            if isinstance(value, str) and _explicit_relative(value):
                data[section][key] = resolve_local(value, base)
    return RunConfig.model_validate(data)


# --------------------------------------------------------------------------------------------
# The recorded config
# --------------------------------------------------------------------------------------------

# A key naming a secret; `…_env` and `…_block` keys name where a secret lives, not the secret.
_SECRET_KEY = re.compile(r"(api[_-]?key|access[_-]?key|secret|password|passwd|credential|authorization|"
                         r"private[_-]?key|(^|_)token$)", re.IGNORECASE)
_NAMES_A_PLACE = re.compile(r"_(env|block)$", re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")
_SECRET_QUERY = re.compile(r"(?P<name>[?&](?:[A-Za-z0-9_-]*(?:token|key|secret|signature|password|credential)"
                           r"[A-Za-z0-9_-]*))=[^&#\s]+", re.IGNORECASE)
# Shapes of common keys: OpenAI/Anthropic-style `sk-…`, Hugging Face `hf_…`, GitHub, Slack, AWS key
# ids, JWTs, `Bearer …` headers, PEM private keys.
_TOKEN_SHAPES = re.compile(
    r"\b(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|"
    r"xox[abposr]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16}|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+)"
    r"|(?i:bearer\s+)[A-Za-z0-9._~+/=-]{12,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
    re.DOTALL)


def redact_text(text: str) -> str:
    """`text` with URL user info, secret-named query values and key-shaped tokens replaced."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m.group('name')}={REDACTED}", text)
    return _TOKEN_SHAPES.sub(REDACTED, text)


def redact_secrets(value: Any, key: str = "") -> Any:
    """A copy of a JSON-like value with every credential-looking part replaced by `***`: values
    under secret-named keys (not `api_key_env`, `credentials_block`), and secret-shaped text."""
    if isinstance(value, dict):
        return {k: redact_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v, key) for v in value]
    if key and _SECRET_KEY.search(key) and not _NAMES_A_PLACE.search(key) and value not in (None, "", False):
        return REDACTED
    return redact_text(value) if isinstance(value, str) else value


def config_record(config: RunConfig, base: Path | None = None) -> dict[str, Any]:
    """What a version stores as `config.yaml`: the canonical config (every setting, defaults
    included), redacted. Loading it back gives the version's `config_hash` unless a value was
    redacted."""
    canonical = canonical_config(config, base) if base is not None else config
    redacted: dict[str, Any] = redact_secrets(canonical.model_dump(mode="json"))
    return redacted

