"""Sidecar transcripts written by real tools, read by `load_transcript`: ffmpeg's WebVTT, ASS and SRT
writers, lhotse's own manifests (`SupervisionSet`/`CutSet.to_file`), praatio's TextGrids (long and
short forms), and JSON shaped exactly as openai-whisper and HF transformers' ASR pipeline return it.
Then end to end: a long recording with an ffmpeg-written VTT next to it, cut by the shard's segmenter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from schemas.config import parse_config
from tasks.ingest import iter_refs
from tasks.segment.clips import shard_clips
from tasks.segment.transcripts import Cue, TranscriptError, Word, load_transcript, text_in_span
from tasks.tally import ShardTally
from tests.support.longform import (
    build_recording,
    ffmpeg_subtitles,
    sample_utterances,
    words_inside,
    write_srt,
)

# Times are multiples of 10 ms (ASS keeps centiseconds); one cue past an hour, one on two lines.
SRT = ("1\n00:00:01,000 --> 00:00:03,500\n<i>Good morning,</i> everyone.\nWelcome back.\n\n"
       "2\n00:01:04,000 --> 00:01:06,250\nRivers &amp; lakes.\n\n"
       "3\n00:01:06,250 --> 00:01:09,990\nAnd then the sea.\n\n"
       "4\n01:00:06,250 --> 01:00:08,000\nThe end.\n")
WANT = [Cue(1.0, 3.5, "Good morning, everyone. Welcome back."), Cue(64.0, 66.25, "Rivers & lakes."),
        Cue(66.25, 69.99, "And then the sea."), Cue(3606.25, 3608.0, "The end.")]


def _times_texts(cues: list[Cue]) -> list[tuple[float, float, str]]:
    return [(round(c.start_s, 6), round(c.end_s, 6), c.text) for c in cues]


# ---------------------------------------------------------------------------------------------
# ffmpeg


def test_ffmpeg_written_webvtt_gives_the_srt_cues(tmp_path: Path) -> None:
    srt = tmp_path / "talk.srt"
    srt.write_text(SRT, encoding="utf-8")
    vtt = ffmpeg_subtitles(srt, tmp_path / "talk.vtt")
    written = vtt.read_text()
    assert written.startswith("WEBVTT") and "00:01.000 --> 00:03.500" in written  # ffmpeg's own style
    assert "01:00:06.250 --> 01:00:08.000" in written
    assert _times_texts(load_transcript(srt)) == _times_texts(WANT)
    assert _times_texts(load_transcript(vtt)) == _times_texts(WANT)
    assert _times_texts(load_transcript(vtt.read_bytes(), name="captions")) == _times_texts(WANT)  # sniffed


def test_ffmpeg_ass_round_trip_to_srt_gives_the_same_cues(tmp_path: Path) -> None:
    """ffmpeg writes ASS ({\\i1} tags, centiseconds), then an SRT from that ASS: the same cues. The ASS
    itself is not a format we read: it is refused with a message saying how to convert it."""
    srt = tmp_path / "talk.srt"
    srt.write_text(SRT, encoding="utf-8")
    ass = ffmpeg_subtitles(srt, tmp_path / "talk.ass")
    assert "{\\i1}Good morning,{\\i0}" in ass.read_text()
    back = ffmpeg_subtitles(ass, tmp_path / "back.srt")
    assert _times_texts(load_transcript(back)) == _times_texts(WANT)
    with pytest.raises(TranscriptError, match=r"talk\.ass line 1: ASS/SSA .*`ffmpeg -i"):
        load_transcript(ass)


# ---------------------------------------------------------------------------------------------
# lhotse

lhotse = pytest.importorskip("lhotse")


def _supervisions() -> object:
    from lhotse import SupervisionSegment, SupervisionSet
    from lhotse.supervision import AlignmentItem

    return SupervisionSet.from_segments([
        SupervisionSegment(id="s1", recording_id="talk", start=1.0, duration=2.5, text="hello there", speaker="A",
                           alignment={"word": [AlignmentItem("hello", 1.0, 0.5), AlignmentItem("there", 1.6, 0.6)]}),
        SupervisionSegment(id="s2", recording_id="talk", start=5.25, duration=1.5, text="general kenobi",
                           speaker="B"),
        SupervisionSegment(id="s3", recording_id="talk", start=8.0, duration=1.75, text="you are a bold one"),
    ])


def _want_lhotse(cues: list[Cue]) -> None:
    assert _times_texts(cues) == [(1.0, 3.5, "hello there"), (5.25, 6.75, "general kenobi"),
                                  (8.0, 9.75, "you are a bold one")]
    assert [c.speaker for c in cues] == ["A", "B", None]
    assert cues[0].words == (Word(1.0, 1.5, "hello"), Word(1.6, 2.2, "there"))
    assert text_in_span(cues, 0.0, 1.55) == "hello" and text_in_span(cues, 1.55, 7.0) == "there general kenobi"


@pytest.mark.parametrize("name", ["talk.jsonl.gz", "talk.jsonl", "talk.json"])
def test_lhotse_supervision_set_written_by_lhotse(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    _supervisions().to_file(path)  # type: ignore[attr-defined]
    _want_lhotse(load_transcript(path))


def _recording(tmp_path: Path, rec_id: str, seconds: float) -> object:
    import soundfile as sf
    from lhotse import Recording

    sf.write(tmp_path / f"{rec_id}.wav", np.zeros(int(seconds * 16_000), np.int16), 16_000, subtype="PCM_16")
    return Recording.from_file(tmp_path / f"{rec_id}.wav", recording_id=rec_id)


def test_lhotse_cut_sets_written_by_lhotse(tmp_path: Path) -> None:
    """A cut set of whole recordings, and one trimmed to its supervisions (each cut's supervision
    starts at 0 within the cut, a neighbour it overlaps rides along): the recording's cues, once each."""
    from lhotse import CutSet, RecordingSet

    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings([_recording(tmp_path, "talk", 12.0)]),
                                 supervisions=_supervisions())
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    _want_lhotse(load_transcript(tmp_path / "cuts.jsonl.gz"))
    trimmed = cuts.trim_to_supervisions(keep_overlapping=True, min_duration=4.0)
    trimmed.to_file(tmp_path / "trimmed.jsonl.gz")
    assert any(s.start != 0 for c in trimmed for s in c.supervisions)  # shifted neighbours are in there
    _want_lhotse(load_transcript(tmp_path / "trimmed.jsonl.gz"))
    CutSet([c.pad(duration=15.0) for c in cuts]).to_file(tmp_path / "mixed.jsonl.gz")  # padding mixes
    with pytest.raises(TranscriptError, match=r"mixed\.jsonl\.gz line 1: .*MixedCut"):
        load_transcript(tmp_path / "mixed.jsonl.gz")


def test_lhotse_manifest_of_two_recordings_needs_the_recording_id(tmp_path: Path) -> None:
    from lhotse import CutSet, RecordingSet, SupervisionSegment, SupervisionSet

    sups = SupervisionSet.from_segments(list(_supervisions()) + [  # type: ignore[call-overload]
        SupervisionSegment(id="o1", recording_id="other", start=0.5, duration=1.0, text="elsewhere")])
    recs = RecordingSet.from_recordings([_recording(tmp_path, "talk", 12.0), _recording(tmp_path, "other", 3.0)])
    for path in (tmp_path / "sups.jsonl.gz", tmp_path / "cuts.jsonl.gz"):
        (sups if path.name.startswith("sups") else CutSet.from_manifests(recordings=recs, supervisions=sups)
         ).to_file(path)
        with pytest.raises(TranscriptError, match="holds 2 recordings.*pass recording_id"):
            load_transcript(path)
        _want_lhotse(load_transcript(path, recording_id="talk"))
        assert _times_texts(load_transcript(path, recording_id="other")) == [(0.5, 1.5, "elsewhere")]


# ---------------------------------------------------------------------------------------------
# praatio


@pytest.mark.parametrize(("fmt", "blanks"), [("long_textgrid", True), ("short_textgrid", True),
                                             ("short_textgrid", False), ("long_textgrid", False)])
def test_praatio_textgrid_words_tier(tmp_path: Path, fmt: str, blanks: bool) -> None:
    """praatio writes a phones tier first, then words, then a point tier; the words tier gives the
    cues: words grouped at pauses (an empty interval, or a gap when praatio leaves blanks out)."""
    textgrid = pytest.importorskip("praatio.textgrid")
    tg = textgrid.Textgrid()
    tg.addTier(textgrid.IntervalTier("phones", [(1.0, 1.2, "HH"), (1.2, 1.5, "AH"), (4.0, 4.3, "S")], 0, 6.0))
    tg.addTier(textgrid.IntervalTier("words", [(1.0, 1.5, "hello"), (1.5, 2.0, "there"), (2.0, 2.2, "sp"),
                                               (2.5, 3.0, 'a "quoted"'), (3.0, 3.4, "word"),
                                               (4.0, 4.75, "again")], 0, 6.0))
    tg.addTier(textgrid.PointTier("tones", [(1.2, "H*"), (4.1, "L%")], 0, 6.0))
    path = tmp_path / "talk.TextGrid"
    tg.save(str(path), format=fmt, includeBlankSpaces=blanks)
    assert ("intervals [1]:" in path.read_text()) == fmt.startswith("long")
    cues = load_transcript(path)
    assert _times_texts(cues) == [(1.0, 2.0, "hello there"), (2.5, 3.4, 'a "quoted" word'), (4.0, 4.75, "again")]
    assert cues[0].words == (Word(1.0, 1.5, "hello"), Word(1.5, 2.0, "there"))
    assert text_in_span(cues, 0.0, 1.6) == "hello" and text_in_span(cues, 1.6, 3.1) == 'there a "quoted"'


# ---------------------------------------------------------------------------------------------
# Whisper-style JSON


def test_openai_whisper_json(tmp_path: Path) -> None:
    """`whisper audio.wav --output_format json [--word_timestamps True]`: text, segments, language."""
    doc = {"text": " Hello there. General Kenobi.", "language": "en", "segments": [
        {"id": 0, "seek": 0, "start": 0.0, "end": 2.4, "text": " Hello there.", "tokens": [50364, 2425, 456, 13],
         "temperature": 0.0, "avg_logprob": -0.21, "compression_ratio": 0.9, "no_speech_prob": 0.01,
         "words": [{"word": " Hello", "start": 0.0, "end": 0.9, "probability": 0.9},
                   {"word": " there.", "start": 1.1, "end": 2.4, "probability": 0.8}]},
        {"id": 1, "seek": 0, "start": 3.0, "end": 5.5, "text": " General Kenobi.", "tokens": [50514, 6996],
         "temperature": 0.0, "avg_logprob": -0.3, "compression_ratio": 0.9, "no_speech_prob": 0.02}]}
    path = tmp_path / "talk.json"
    path.write_text(json.dumps(doc))
    cues = load_transcript(path)
    assert _times_texts(cues) == [(0.0, 2.4, "Hello there."), (3.0, 5.5, "General Kenobi.")]
    assert cues[0].words == (Word(0.0, 0.9, "Hello"), Word(1.1, 2.4, "there.")) and cues[1].words == ()
    assert text_in_span(cues, 0.0, 1.0) == "Hello" and text_in_span(cues, 1.0, 6.0) == "there. General Kenobi."


def test_hf_pipeline_chunks_are_refused_by_name(tmp_path: Path) -> None:
    """transformers' ASR pipeline with return_timestamps=True returns {"text", "chunks": [{"timestamp":
    (start, end), "text"}]}; the reader takes Whisper's `segments` form only and says so."""
    doc = {"text": " Hello there. General Kenobi.",
           "chunks": [{"timestamp": (0.0, 2.4), "text": " Hello there."},
                      {"timestamp": (3.0, 5.5), "text": " General Kenobi."}]}
    path = tmp_path / "talk.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TranscriptError, match=r'talk\.json: .*"segments" list'):
        load_transcript(path)


# ---------------------------------------------------------------------------------------------
# End to end: a long recording, an ffmpeg-written VTT next to it, the shard's segmenter


def test_long_recording_with_an_ffmpeg_vtt_sidecar_is_cut_with_its_words(tmp_path: Path) -> None:
    folder = tmp_path / "talks"
    rec = build_recording(folder / "rec.wav", sample_utterances(), seed=3, seconds=45)
    write_srt(tmp_path / "rec.srt", rec)
    ffmpeg_subtitles(tmp_path / "rec.srt", folder / "rec.vtt")  # the only sidecar next to the audio
    config = parse_config({"sources": [{"path": str(folder), "dataset": "talks", "language": "en"}],
                           "output": {"root": str(tmp_path / "out"), "dataset": "longform"},
                           "segment": {"min_s": 2.0, "max_s": 12.0, "vad": "energy", "min_silence_s": 0.3}})
    tally = ShardTally()
    clips = list(shard_clips(iter_refs(config.sources), config, tally))
    assert tally.quarantine == [] and tally.recordings_cut == 1 and len(clips) >= 3
    spans = []
    for clip in clips:
        m = re.fullmatch(r"talks/rec@(\d+)-(\d+)", clip.id)
        assert m is not None, clip.id
        start, end = int(m[1]) / 1000, int(m[2]) / 1000
        assert clip.offset_s == pytest.approx(start, abs=1e-3)
        spans.append((start, end))
        assert clip.transcript == (words_inside(rec, start, end) or None), clip.id
    for u in rec.utterances:  # every cue's words land in exactly one segment
        assert sum(a <= u.start_s and u.end_s <= b for a, b in spans) == 1, (u, spans)
