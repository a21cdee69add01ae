"""The dataset card: `<dataset>/<version>/README.md`, rendered from the manifest alone.

The YAML header is what the Hugging Face Hub and `datasets.load_dataset(<version dir>)` read:
`configs` points the default config's train split at the version's shards: `data/*.parquet` for a
manifest of layout 1 (and a pulled copy), the data keys relative to the version dir
(`../../<dataset>/data/<run-id>/….parquet`, which `datasets` resolves for a local root) for layout 2;
`dataset_info.features`
is the manifest's HF features in the card's list format. The body is for humans: counts,
quarantine reasons, attribute distributions, lineage and the shard table (and, since audio is
stored once, the audio files the shards name; a version's bytes count each once). Only manifest fields
are rendered (no store URIs or endpoints), and sampling keys that look like secrets are masked.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import yaml

from schemas.manifest import Manifest, ShardInfo

log = logging.getLogger(__name__)

DATA_FILES_GLOB = "data/*.parquet"
LICENSE_NOTE = (
    "The generated text (seed descriptions, prompts, responses) is released under the terms chosen by the "
    "dataset's publisher. The audio is copied from the source corpora listed in the `dataset` column and "
    "keeps each source corpus's own licence; check those licences before redistributing the audio."
)
# Sampling keys that could hold a secret (max_tokens, top_k … do not match).
_SECRET_KEY = re.compile(r"(api[_-]?key|access[_-]?key|secret|password|passwd|credential|authorization|"
                         r"(^|_)token$)", re.IGNORECASE)


def _snake(name: str) -> str:
    """'ClassLabel' → 'class_label', 'Json' → 'json' (the card's spelling of a feature type)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _simplify(feature: dict[str, Any]) -> dict[str, Any]:
    for list_type in ("large_list", "list", "sequence"):
        inner = feature.get(list_type)
        if isinstance(inner, dict) and list(inner) == ["dtype"]:
            feature[list_type] = inner["dtype"]
        elif isinstance(inner, dict) and list(inner) == ["struct"]:
            feature[list_type] = inner["struct"]
    return feature


def _yaml_feature(obj: Any) -> dict[str, Any]:
    """One `datasets` feature JSON value → its card (YAML) form, as `Features._to_yaml_list` does."""
    if isinstance(obj, list | tuple):
        return _simplify({"list": _simplify(_yaml_feature(obj[0]))})
    if not isinstance(obj, dict):
        raise TypeError(f"unexpected feature description {obj!r}")
    obj = dict(obj)
    kind = obj.pop("_type", None)
    if kind in ("List", "LargeList", "Sequence"):
        inner = obj.pop("feature")
        key = {"List": "list", "LargeList": "large_list", "Sequence": "sequence"}[kind]
        return _simplify({key: _yaml_feature(inner), **obj})
    if kind == "Value":
        return obj
    if kind and not obj:
        return {"dtype": _snake(kind)}
    if kind:
        return {"dtype": _simplify({_snake(kind): obj})}
    return {"struct": [{"name": name, **_yaml_feature(value)} for name, value in obj.items()]}


def features_yaml(hf_features: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's HF features as the card's `dataset_info.features` list."""
    return [{"name": name, **_yaml_feature(value)} for name, value in hf_features.items()]


def audio_files(manifest: Manifest) -> list[ShardInfo]:
    """The distinct audio files a version's shards name (audio stored once; none before it), in
    shard order: several shards, of this version or others, may share one."""
    return list({s.audio.path: s.audio for s in manifest.shards if s.audio is not None}.values())


def stored_bytes(manifest: Manifest) -> int:
    """What a version's rows take in the store: its shards plus each audio file they name, once."""
    return sum(s.bytes for s in manifest.shards) + sum(a.bytes for a in audio_files(manifest))


def data_files(manifest: Manifest) -> str | list[str]:
    """The card's train files, relative to the version dir (see the module doc)."""
    if manifest.layout == 1:
        return DATA_FILES_GLOB
    return [f"../../{s.path}" for s in manifest.shards]  # layout 2: root-relative data keys


def card_metadata(manifest: Manifest) -> dict[str, Any]:
    """The YAML header as a dict (also handy for tests and tools)."""
    lin = manifest.lineage
    info: dict[str, Any] = {"config_name": "default"}
    if manifest.hf_features:
        try:
            info["features"] = features_yaml(manifest.hf_features)
        except (TypeError, KeyError, AttributeError) as exc:  # a card must never block a commit
            log.warning("dataset card: features left out (%s)", exc)
    # `datasets` ignores the whole `splits` entry (with a warning) unless it has name, num_bytes and
    # num_examples. Its num_bytes is the split's Arrow size, which the manifest does not record; the
    # Parquet bytes stand in (audio, the bulk, is compressed FLAC either way). Only num_examples is
    # verified on load, and it counts the rows of exactly the files `configs` points at.
    shard_bytes = sum(s.bytes for s in manifest.shards)
    info["splits"] = [{"name": "train", "num_bytes": shard_bytes, "num_examples": sum(s.rows for s in manifest.shards)}]
    info["download_size"] = shard_bytes
    info["dataset_size"] = shard_bytes
    return {
        "pretty_name": f"{lin.dataset} {lin.version}",
        "license": "other",
        "license_name": "source-corpora",
        "tags": ["speech", "audio", "speech-text-pairs", "desta", "speechpairs"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_files(manifest)}]}],
        "dataset_info": info,
    }


def _md(text: object) -> str:
    """A table-cell-safe rendering of a value."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _shard_table(shards: list[ShardInfo]) -> list[str]:
    lines = ["| path | rows | bytes | sha256 |", "|---|---:|---:|---|"]
    lines += [f"| `{_md(s.path)}` | {s.rows:,} | {s.bytes:,} | `{s.sha256}` |" for s in shards]
    return lines


def _masked(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if _SECRET_KEY.search(k) else v) for k, v in mapping.items()}


def render_card(manifest: Manifest) -> str:
    """README.md for one version: HF YAML header, then counts, distributions, lineage, shards."""
    lin, st = manifest.lineage, manifest.stats
    audio = audio_files(manifest)
    header = yaml.safe_dump(card_metadata(manifest), sort_keys=False, allow_unicode=True, width=1000)
    out = ["---", header.rstrip("\n"), "---", "", f"# {lin.dataset} {lin.version}", ""]
    out += [
        ("Speech–text pairs generated with the DeSTA2 recipe by speechpairs: each row holds a real audio "
         "clip, the seed description built from its measured attributes, an instruction and the text "
         "LLM's response (the training target)."),
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---:|",
        f"| rows | {st.rows:,} |",
        f"| audio hours | {st.audio_hours:.4f} |",
        f"| clips in | {st.clips_in:,} |",
        f"| quarantined | {st.quarantined:,} |",
        f"| shards | {len(manifest.shards)} |",
        *([f"| audio files | {len(audio)} |"] if audio else []),
        f"| bytes | {stored_bytes(manifest):,} |",
        "",
        "## Quarantine by reason",
        "",
    ]
    if st.quarantine_by_reason:
        out += ["| reason | clips |", "|---|---:|"]
        out += [f"| {_md(reason)} | {n:,} |"
                for reason, n in sorted(st.quarantine_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))]
    else:
        out.append("No clip was quarantined.")
    if st.qc_failures:
        note = ("Every response that failed a QC rule, regenerated ones included (a failure after the last "
                "regeneration is a `qc_<rule>` quarantine above).")
        out += ["", "## Response QC", "", note, "", "| rule | failed responses |", "|---|---:|"]
        ranked = sorted(st.qc_failures.items(), key=lambda kv: (-kv[1], kv[0]))
        out += [f"| {_md(rule)} | {n:,} |" for rule, n in ranked]
    out += ["", "## Attribute distributions", ""]
    if st.attribute_counts:
        out.append("Share = rows with this value ÷ all rows of the version.")
        for attribute, counts in st.attribute_counts.items():
            out += ["", f"### {_md(attribute)}", "", "| value | rows | share |", "|---|---:|---:|"]
            for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                share = n / st.rows if st.rows else 0.0
                out.append(f"| {_md(value)} | {n:,} | {share:.1%} |")
    else:
        out.append("No attribute counts recorded.")
    models = ", ".join(f"{m.role}={m.name}" + (f"@{m.revision}" if m.revision else "") for m in lin.models)
    sampling = ", ".join(f"{k}={v}" for k, v in sorted(_masked(lin.sampling).items()))
    extractors = ", ".join(f"{k}={v}" for k, v in sorted(lin.extractor_versions.items()))
    out += [
        "",
        "## Lineage",
        "",
        "| | |",
        "|---|---|",
        f"| dataset | {_md(lin.dataset)} |",
        f"| version | {_md(lin.version)} |",
        f"| parent | {_md(lin.parent or '-')} |",
        *([f"| built from | {_md(', '.join(lin.parents))} |"] if lin.parents else []),
        f"| created | {lin.created_at.isoformat()} |",
        f"| run id | {_md(lin.run_id)} |",
        f"| flow run id | {_md(lin.flow_run_id or '-')} |",
        f"| code version | {_md(lin.code_version)} |",
        f"| config hash | {_md(lin.config_hash)} |",
        f"| bins version | {_md(lin.bins_version)} |",
        f"| prompt pool hash | {_md(lin.prompt_pool_hash)} |",
        f"| models | {_md(models or '-')} |",
        f"| sampling | {_md(sampling or '-')} |",
        f"| extractors | {_md(extractors or '-')} |",
        "",
        "## Shards",
        "",
        *_shard_table(manifest.shards),
    ]
    if audio:
        note = ("Audio files (each clip's audio stored once, joined to the rows by `id`; shared with the runs and "
                "versions that measured the same clips):")
        out += ["", note, "", *_shard_table(audio)]
    if manifest.quarantine:
        out += ["", "Quarantine parts (rows that did not make it, with their reason):", "",
                *_shard_table(manifest.quarantine)]
    out += [
        "",
        ("`manifest.json` next to this card lists the same files with their checksums; it is written last, "
         "so a version with a manifest is complete."),
        "",
        "## Licence",
        "",
        LICENSE_NOTE,
        "",
    ]
    return "\n".join(out)
