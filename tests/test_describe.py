import json
from pathlib import Path

import pytest

from schemas.records import Features
from tasks.describe import (
    attribute_words,
    format_timestamp,
    load_bins,
    load_instruction_pool,
    pick_instruction,
    pool_hash,
    seed_description,
)

BINS = load_bins(None)


def test_seed_formats_exactly() -> None:
    attrs = {"Gender": "Female", "Emotion": "Happy", "Pitch": "High", "Speaking speed": "Fast"}
    assert seed_description("The food is really good", 5.0, attrs, "desta25") == (
        "[00:00-00:05] The food is really good (Gender: Female, Emotion: Happy, Pitch: High, Speaking speed: Fast)"
    )
    assert seed_description("The food is really good", 5.0, attrs, "desta2") == (
        "[00:00:00 - 00:00:05] The food is really good (Gender: Female, Emotion: Happy, Pitch: High, "
        "Speaking speed: Fast)"
    )


def test_seed_without_transcript_has_labels_only() -> None:
    assert seed_description(None, 10.2, {"Gender": "Male"}, "desta25") == "[00:00-00:10] (Gender: Male)"
    assert seed_description("  ", 0.4, {}, "desta25") == "[00:00-00:01]"
    assert seed_description("two  spaces\nand newline", 75, {}, "desta2") == "[00:00:00 - 00:01:15] two spaces and newline"


@pytest.mark.parametrize(("sec", "fmt", "text"), [(0, "desta25", "00:00"), (59.6, "desta25", "01:00"),
                                                   (3725, "desta2", "01:02:05"), (3725, "desta25", "62:05")])
def test_timestamps(sec: float, fmt: str, text: str) -> None:
    assert format_timestamp(sec, fmt) == text


def test_pitch_bins_are_gender_aware() -> None:
    f = Features(pitch_mean_hz=170.0, gender="male")
    assert attribute_words(f, BINS, ["pitch"]) == {"Pitch": "Very high"}
    assert attribute_words(f.model_copy(update={"gender": "female"}), BINS, ["pitch"]) == {"Pitch": "Low"}
    assert attribute_words(f.model_copy(update={"gender": None}), BINS, ["pitch"]) == {"Pitch": "Normal"}


def test_bins_edges_and_words() -> None:
    speed = BINS.speed
    words = [speed.word(v) for v in (1.0, 2.5, 4.0, 5.5, 9.0)]
    assert words == ["Very slow", "Slow", "Normal", "Fast", "Very fast"]
    assert BINS.noise.word(5.0) == "Very high" and BINS.noise.word(60.0) == "Very low"
    assert BINS.volume.word(-24.0) == "Normal"
    assert BINS.full_version.startswith("speechpairs-bins/1+")


def test_attribute_order_and_missing_are_omitted() -> None:
    f = Features(gender="female", pitch_mean_hz=240.0, speaking_rate_sps=6.5, loudness_lufs=-20.0, snr_db=None,
                 emotion="happy", accent="scottish english")
    got = attribute_words(f, BINS, ["speed", "gender", "emotion", "accent", "noise", "pitch", "age"])
    assert list(got.items()) == [("Speaking speed", "Very fast"), ("Gender", "Female"), ("Emotion", "Happy"),
                                 ("Accent", "Scottish english"), ("Pitch", "High")]


def test_seed_with_whisper_segments_gets_one_span_each() -> None:
    from schemas.records import Segment

    segs = [Segment(start_s=0.0, end_s=2.4, text=" Hello there."), Segment(start_s=2.4, end_s=5.1, text="Bye. ")]
    assert seed_description("Hello there. Bye.", 5.1, {"Gender": "Male"}, "desta25", segs) == (
        "[00:00-00:02] Hello there. [00:02-00:05] Bye. (Gender: Male)")
    assert seed_description("Hello there. Bye.", 5.1, {}, "desta2", segs[:1]) == "[00:00:00 - 00:00:02] Hello there."
    assert seed_description("Hi", 3.0, {}, "desta25", []) == "[00:00-00:03] Hi"


def test_custom_bins_file_validated_and_versioned(tmp_path: Path) -> None:
    data = json.loads((Path(__file__).parents[1] / "tasks" / "resources" / "bins_v1.json").read_text())
    data["speed"]["edges"] = [3.0, 2.0, 5.0, 6.0]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="strictly ascending"):
        load_bins(str(tmp_path / "bad.json"))
    data["speed"]["edges"] = [1.0, 2.0, 5.0, 6.0]
    (tmp_path / "ok.json").write_text(json.dumps(data))
    assert load_bins(str(tmp_path / "ok.json")).full_version != BINS.full_version


def test_instruction_pool_sampling_is_deterministic_and_spread(tmp_path: Path) -> None:
    (tmp_path / "pool.txt").write_text("# comment\nDescribe the speaker.\n\nWhat is said?\nHow does it sound?\n")
    pool = load_instruction_pool(str(tmp_path / "pool.txt"))
    assert pool == ("Describe the speaker.", "What is said?", "How does it sound?")
    picks = [pick_instruction(pool, 0, f"c/{i}") for i in range(300)]
    assert picks == [pick_instruction(pool, 0, f"c/{i}") for i in range(300)]
    assert {p: picks.count(p) for p in pool}.keys() == set(pool)
    assert min(picks.count(p) for p in pool) > 60
    assert picks != [pick_instruction(pool, 1, f"c/{i}") for i in range(300)]
    assert pool_hash(pool) != pool_hash(pool[:2])
    assert load_instruction_pool(None) == ("What can you hear from the audio?",)


def test_builtin_pool_alias_loads_the_shipped_versioned_pool() -> None:
    from schemas.config import DescribeConfig
    from tasks.describe import instruction_pool

    pool = instruction_pool(DescribeConfig(instruction_pool="builtin"))
    assert len(pool) >= 200 and "What can you hear from the audio?" in pool
    assert pool_hash(pool) == pool_hash(instruction_pool(DescribeConfig(instruction_pool="builtin")))
