"""`datasets diff`'s settings section (storage/diff.py settings_changes) on recorded run configs."""

from __future__ import annotations

from storage.diff import settings_changes


def test_changed_added_and_removed_settings_are_named() -> None:
    a = {"llm": {"temperature": 0.05, "model": "m"}, "output": {"dataset": "d"}}
    b = {"llm": {"temperature": 0.2}, "output": {"dataset": "d", "shard_size": 500}}
    assert settings_changes(a, b) == ["llm.temperature: 0.05 → 0.2", "llm.model: m → (unset)",
                                      "output.shard_size: (unset) → 500"]


def test_a_setting_added_later_with_a_null_default_is_no_change() -> None:
    # A version recorded before `output.base` existed, against one that records its default (null).
    old = {"output": {"dataset": "d"}}
    new = {"output": {"dataset": "d", "base": None}}
    assert settings_changes(old, new) == []
    assert settings_changes(new, {"output": {"dataset": "d", "base": "latest"}}) == ["output.base: null → latest"]
