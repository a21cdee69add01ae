"""What changed between two versions, from their manifests and recorded configs (no shard is read),
and which shards they share."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from schemas.manifest import Lineage, Manifest
from storage.card import audio_files, stored_bytes
from storage.versions import file_key

UNSET = "(unset)"


def _num(a: float, b: float, fmt: str = ",") -> str:
    delta = b - a
    return f"{a:{fmt}} → {b:{fmt}} ({delta:+{fmt}})"


def _share(n: int, rows: int) -> float:
    return n / rows if rows else 0.0


def _lineage_items(lin: Lineage) -> dict[str, Any]:
    """Flat comparable view of what produced a version (identity fields left out)."""
    items: dict[str, Any] = {
        "code_version": lin.code_version,
        "config_hash": lin.config_hash,
        "bins_version": lin.bins_version,
        "prompt_pool_hash": lin.prompt_pool_hash,
        "run_id": lin.run_id,
    }
    if lin.parents:
        items["parents"] = ", ".join(lin.parents)
    for m in lin.models:
        items[f"models.{m.role}"] = m.name + (f"@{m.revision}" if m.revision else "")
    for k, v in lin.sampling.items():
        items[f"sampling.{k}"] = v
    for k, v in lin.extractor_versions.items():
        items[f"extractors.{k}"] = v
    return items


def flatten_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"llm": {"temperature": 0.2}} → {"llm.temperature": 0.2}; lists of mappings by index
    (`sources.0.path`), lists of plain values as one setting (`describe.attributes`)."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            out.update(flatten_settings(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            out.update(flatten_settings(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = value
    return out


def _setting(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def settings_changes(config_a: Mapping[str, Any], config_b: Mapping[str, Any]) -> list[str]:
    """`llm.temperature: 0.05 → 0.2` for every setting that differs (added/removed ones as (unset);
    a setting absent on one side and null on the other is no change)."""
    fa, fb = flatten_settings(config_a), flatten_settings(config_b)
    # A setting added later with a null default (e.g. output.base) is no change against an older
    # record that lacks it: absent and null compare equal.
    return [f"{name}: {_setting(fa[name]) if name in fa else UNSET} → {_setting(fb[name]) if name in fb else UNSET}"
            for name in dict.fromkeys([*fa, *fb]) if fa.get(name) != fb.get(name)]


def _settings_section(manifest_a: Manifest, manifest_b: Manifest, config_a: Mapping[str, Any] | None,
                      config_b: Mapping[str, Any] | None) -> list[str]:
    missing = [m.lineage.version for m, c in ((manifest_a, config_a), (manifest_b, config_b))
               if m.config is None or c is None]
    if missing:
        return [(f"settings: not recorded for {', '.join(dict.fromkeys(missing))} (committed before run configs "
                 "were stored); see config_hash under lineage")]
    assert config_a is not None and config_b is not None
    changes = settings_changes(config_a, config_b)
    return ["settings changes:", *(f"  {line}" for line in changes)] if changes else ["settings: unchanged"]


def shared_shards(manifest_a: Manifest, manifest_b: Manifest) -> str:
    """Which shards the versions share (the same store key: a composed or based version references
    its sources' files), by count and bytes, and which are only in one of them; the same for their
    audio files, when either names any."""
    keys_a = {file_key(manifest_a, s): s.bytes for s in manifest_a.shards}
    keys_b = {file_key(manifest_b, s): s.bytes for s in manifest_b.shards}
    both = keys_a.keys() & keys_b.keys()
    only_a, only_b = keys_a.keys() - both, keys_b.keys() - both

    def part(keys: set[str], sizes: dict[str, int]) -> str:
        return f"{len(keys)} ({sum(sizes[k] for k in keys):,} bytes)"

    la, lb = manifest_a.lineage, manifest_b.lineage
    text = (f"shared shards: {part(both, keys_a)}; only in {la.dataset}@{la.version}: {part(only_a, keys_a)}; "
            f"only in {lb.dataset}@{lb.version}: {part(only_b, keys_b)}")
    # Audio stored once: a re-run that changed only the LLM shares every audio file, no shard.
    audio_a = {file_key(manifest_a, a): a.bytes for a in audio_files(manifest_a)}
    audio_b = {file_key(manifest_b, a): a.bytes for a in audio_files(manifest_b)}
    if audio_a or audio_b:
        both = audio_a.keys() & audio_b.keys()
        only_a, only_b = audio_a.keys() - both, audio_b.keys() - both
        text += (f"\nshared audio files: {part(both, audio_a)}; only in {la.dataset}@{la.version}: "
                 f"{part(only_a, audio_a)}; only in {lb.dataset}@{lb.version}: {part(only_b, audio_b)}")
    return text


def diff_versions(manifest_a: Manifest, manifest_b: Manifest, config_a: Mapping[str, Any] | None = None,
                  config_b: Mapping[str, Any] | None = None, *, same_root: bool = True) -> str:
    """A human-readable report: counts, shared shards (when both are on one root), quarantine
    reasons, attribute distributions, the settings that changed (from each version's recorded
    config, when both have one), lineage."""
    la, lb = manifest_a.lineage, manifest_b.lineage
    sa, sb = manifest_a.stats, manifest_b.stats
    lines = [
        f"{la.dataset}@{la.version} → {lb.dataset}@{lb.version}",
        f"rows:         {_num(sa.rows, sb.rows)}",
        f"audio hours:  {_num(sa.audio_hours, sb.audio_hours, '.4f')}",
        f"clips in:     {_num(sa.clips_in, sb.clips_in)}",
        f"quarantined:  {_num(sa.quarantined, sb.quarantined)}",
        f"shards:       {_num(len(manifest_a.shards), len(manifest_b.shards))}",
        f"bytes:        {_num(stored_bytes(manifest_a), stored_bytes(manifest_b))}",
    ]
    if same_root:
        lines.append(shared_shards(manifest_a, manifest_b))
    reasons = sorted(set(sa.quarantine_by_reason) | set(sb.quarantine_by_reason))
    if reasons:
        lines.append("quarantined by reason:")
        lines += [f"  {r}: {_num(sa.quarantine_by_reason.get(r, 0), sb.quarantine_by_reason.get(r, 0))}"
                  for r in reasons]

    attributes = list(dict.fromkeys([*sa.attribute_counts, *sb.attribute_counts]))
    if attributes:
        lines.append("attribute distributions (rows, share of rows; Δ count, Δ share in points):")
    width = max((len(v) for counts in [*sa.attribute_counts.values(), *sb.attribute_counts.values()]
                 for v in counts), default=0)
    for attr in attributes:
        ca, cb = sa.attribute_counts.get(attr, {}), sb.attribute_counts.get(attr, {})
        lines.append(f"  {attr}:")
        values = sorted(set(ca) | set(cb), key=lambda v: (-(cb.get(v, 0) + ca.get(v, 0)), v))
        for v in values:
            na, nb = ca.get(v, 0), cb.get(v, 0)
            pa, pb = _share(na, sa.rows), _share(nb, sb.rows)
            lines.append(f"    {v:<{width}}  {na:>7,} ({pa:6.1%}) → {nb:>7,} ({pb:6.1%})  "
                         f"{nb - na:+,}  {100 * (pb - pa):+.1f} pp")

    lines += _settings_section(manifest_a, manifest_b, config_a, config_b)
    ia, ib = _lineage_items(la), _lineage_items(lb)
    changed = [k for k in dict.fromkeys([*ia, *ib]) if ia.get(k) != ib.get(k)]
    if changed:
        lines.append("lineage changes:")
        lines += [f"  {k}: {ia.get(k, '-')} → {ib.get(k, '-')}" for k in changed]
    else:
        lines.append("lineage: unchanged")
    return "\n".join(lines)
