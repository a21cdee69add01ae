"""Exports read the way the DeSTA trainers read them: `datasets`' json loader, a real (tiny) HF
tokenizer with a Llama-3-style chat template, audio files decoded with soundfile.

DeSTA2.5-Audio: render `messages` with a generation prompt, count `<|AUDIO|>` against the
message audios, append `response` + eos as the target. DeSTA2 (NeMo recipe): render its
two-turn template (an `audio` turn with the locator and `{transcription}`, a `user` turn with
`{input}`), fill it with `str.format`, split on the locator, append `target` + eos.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from flows.cli import main
from storage.objectstore import LocalStore
from tests.support.datasets_support import LocalVersion
from tests.support.stored import stored_rows

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Llama-3 layout: header ids around the role, <|eot_id|> after each turn, an assistant header as
# the generation prompt. Keys a message has beyond role/content (our `audios`) are ignored.
LLAMA3_STYLE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GENERATION_PROMPT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tiny_tokenizer(locators: list[str]) -> Any:
    """A word-level tokenizer whose special tokens include the audio locators (as the trainers add them)."""
    words = ["what", "can", "you", "hear", "from", "the", "audio", "?", "describe"]
    vocab = {t: i for i, t in enumerate(["[UNK]", *SPECIALS, *locators, *words])}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token="[UNK]",
        additional_special_tokens=[*SPECIALS[1:3], *locators])
    tok.chat_template = LLAMA3_STYLE_TEMPLATE
    return tok


def export(local_version: LocalVersion, fmt: str, dest: Path, *extra: str) -> list[dict[str, Any]]:
    assert main(["datasets", "export", fmt, local_version.uri, str(dest), "--no-progress", *extra]) == 0
    name = f"{local_version.dataset}.jsonl" if fmt == "desta" else f"{local_version.dataset}.desta2.jsonl"
    # The trainers read the JSONL with `datasets`' json loader: it must load, with consistent types.
    loaded = datasets.load_dataset("json", data_files=str(dest / name), split="train",
                                   cache_dir=str(dest.parent / f"hf-{dest.name}"))
    return list(loaded)


def rows_by_id(local_version: LocalVersion) -> dict[str, dict[str, Any]]:
    """The stored rows, audio bytes from the shards' audio files by id (audio stored once)."""
    return stored_rows(LocalStore(local_version.root), local_version.handle().manifest)


def assert_same_samples(path: Path, stored: bytes) -> None:
    """The exported file decodes to exactly the samples of the row's stored audio."""
    import io

    got, sr = sf.read(path, dtype="float32")
    want, want_sr = sf.read(io.BytesIO(stored), dtype="float32")
    assert sr == want_sr == 16_000 and got.shape == want.shape and np.array_equal(got, want)


def test_desta25_export_renders_as_the_trainer_reads_it(local_version: LocalVersion, tmp_path: Path) -> None:
    dest = tmp_path / "desta"
    lines = export(local_version, "desta", dest)
    rows = rows_by_id(local_version)
    tok = tiny_tokenizer(["<|AUDIO|>"])
    assert len(lines) == len(rows) == 10 and {ln["clip_id"] for ln in lines} == set(rows)
    for line in lines:
        row = rows[line["clip_id"]]
        messages = line["messages"]
        assert [m["role"] for m in messages] == ["system", "user"]  # input only: no assistant turn
        audios = [a for m in messages if m.get("audios") for a in m["audios"]]  # as the trainer gathers them
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        target = line["response"] + tok.eos_token

        assert line["response"] == row["response"] and row["response"] not in rendered
        assert row["seed_description"] not in rendered  # the trained model hears the audio instead
        assert rendered.endswith(GENERATION_PROMPT) and (rendered + target).endswith(row["response"] + "<|eot_id|>")
        assert rendered.count("<|AUDIO|>") == len(audios) == 1
        assert tok.tokenize(rendered).count("<|AUDIO|>") == len(audios)  # one locator token per audio
        assert f"{row['prompt']} <start_audio><|AUDIO|><end_audio><|eot_id|>" in rendered  # documented order
        assert "<start_audio>" in messages[0]["content"] and "<end_audio>" in messages[0]["content"]

        assert audios == [{"audio": line["id"], "text": row["transcript"] or " "}]
        assert not os.path.isabs(line["id"]) and (dest / line["id"]).is_file()
        assert_same_samples(dest / line["id"], row["audio"]["bytes"])
        assert (line["dataset"], line["seed_description"], line["prompt"]) == (
            row["dataset"], row["seed_description"], row["prompt"])
    assert any(a["text"].strip() for ln in lines for a in ln["messages"][1]["audios"])  # transcripts carried


def test_desta25_options_no_system_locator_and_order(local_version: LocalVersion, tmp_path: Path) -> None:
    lines = export(local_version, "desta", tmp_path / "opts", "--no-system", "--audio-locator", "<audio>",
                   "--audio-start", "", "--audio-end", "", "--audio-position", "before")
    tok = tiny_tokenizer(["<audio>"])
    rows = rows_by_id(local_version)
    for line in lines:
        row = rows[line["clip_id"]]
        (user,) = line["messages"]
        assert user["role"] == "user" and user["content"] == f"<audio> {row['prompt']}"
        rendered = tok.apply_chat_template(line["messages"], tokenize=False, add_generation_prompt=True)
        assert rendered.count("<audio>") == len(user["audios"]) == 1 and row["response"] not in rendered
        assert "<|AUDIO|>" not in rendered and "system" not in rendered

    lines = export(local_version, "desta", tmp_path / "own-system", "--system", "Listen closely.")
    assert {ln["messages"][0]["content"] for ln in lines} == {"Listen closely."}
    # A system prompt containing the locator would give the trainer one locator too many.
    assert main(["datasets", "export", "desta", local_version.uri, str(tmp_path / "bad"), "--no-progress",
                 "--system", "Audio: <|AUDIO|>"]) == 2
    assert main(["datasets", "export", "desta2", local_version.uri, str(tmp_path / "bad2"), "--no-system"]) == 2
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_desta2_export_fills_the_nemo_recipe_template(local_version: LocalVersion, tmp_path: Path) -> None:
    dest = tmp_path / "desta2"
    lines = export(local_version, "desta2", dest)
    rows = rows_by_id(local_version)
    locator = "|audio_features|"
    tok = tiny_tokenizer([locator])
    # The recipe's dataset config: the audio turn holds the locator and the transcription, the user
    # turn the instruction; fields are filled in with str.format after rendering.
    template = tok.apply_chat_template(
        [{"role": "audio", "content": locator + "{transcription}"}, {"role": "user", "content": "{input}"}],
        tokenize=False, add_generation_prompt=True)
    assert len(lines) == 10
    for line in lines:
        row = rows[line["id"]]
        context = template.format(**{k: line[k] for k in ("input", "transcription")})
        assert len(context.split(locator)) == 2  # the recipe's own check
        assert line["target"] == row["response"] and row["response"] not in context
        assert line["input"] == row["prompt"] and line["transcription"] == (row["transcript"] or "")
        path = dest / line["audio_filepath"]  # data_root + "/" + audio_filepath
        info = sf.info(path)
        assert line["duration"] == pytest.approx(info.frames / info.samplerate, abs=1e-6)
        assert line["duration"] == pytest.approx(row["duration_s"], abs=1e-3)
        assert_same_samples(path, row["audio"]["bytes"])
    assert json.loads((dest / "demo.desta2.jsonl").read_text().splitlines()[0])["audio_filepath"].startswith("audio/")
