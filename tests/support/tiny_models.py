"""Builders of tiny random-weight models, saved the way the real ones are, for tests and benches.

Nothing here downloads anything: each builder makes a model from a fixed seed, writes it to a
local path in the format its library loads, and returns that path. torch / whisper are imported
inside the builders so importing this module costs nothing.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

# Multilingual Whisper vocabularies: 51865 = 99 languages (tiny … large-v2), 51866 = 100 (large-v3).
WHISPER_MULTILINGUAL_VOCAB = 51865
WHISPER_V3_VOCAB = 51866


def build_micro_whisper(path: Path, n_mels: int = 80, n_vocab: int = WHISPER_MULTILINGUAL_VOCAB,
                        seed: int = 0) -> Path:
    """A 1-layer, 32-wide Whisper with random weights, saved as an openai-whisper checkpoint.

    The checkpoint has the official layout ({"dims": ..., "model_state_dict": ...}) so
    `whisper.load_model(str(path))` loads it. The audio context (1500 frames = 30 s) and the
    vocabulary must match the real ones: the encoder checks the 30-s frame count and the
    tokenizer's special tokens (languages, timestamps) sit at fixed ids. `n_mels=128` with
    `n_vocab=51866` mimics large-v3. About 7 MB on disk.
    """
    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(
        n_mels=n_mels, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
        n_vocab=n_vocab, n_text_ctx=448, n_text_state=32, n_text_head=2, n_text_layer=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Whisper(dims)
        # whisper leaves the text positional embedding as torch.empty (real checkpoints overwrite
        # it): uninitialised memory would make the model nondeterministic and can hold NaN.
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def build_tiny_audio_classifier(path: Path, labels: list[str], seed: int = 0,
                                weight_std: float = 0.4) -> Path:
    """A 2-layer, 32-wide wav2vec2 audio classifier with random weights, saved with save_pretrained.

    The layout is the real one (7 conv layers, total stride 320, so 50 frames/s; layer-norm
    feature encoder with the stable-layer-norm transformer, as in wav2vec2-large-robust), only
    narrow. The feature extractor returns an attention mask, so padded batches give the same
    scores as single clips. Matrices are redrawn with std `weight_std` (0.4, not the usual 0.02):
    a default-initialised head gives near-uniform scores and one top label for every clip, which
    would let a padding bug pass unnoticed. id2label/label2id come from `labels`. Loads with
    `AutoModelForAudioClassification.from_pretrained(path)`. About 0.2 MB on disk.
    """
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16,
        id2label=dict(enumerate(labels)),  # sets num_labels too
        label2id={label: i for i, label in enumerate(labels)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2ForSequenceClassification(config)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() > 1:
                    parameter.normal_(0.0, weight_std)
    model.eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return path


# Chat template of the tiny causal LM: BOS, then `<|role|>` + newline + content + end-of-turn per message.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_TINY_LM_TEXT = [
    "From the audio clip, I can hear a female speaker say the food is really good in a happy tone.",
    "A male speaker with a low-pitched voice talks slowly; the background is very noisy.",
    "What can you hear from the audio? Describe the speaker, the emotion and the content.",
    "The quick brown fox jumps over the lazy dog, said an old man with an English accent.",
]


def build_tiny_causal_lm(path: Path, seed: int = 0, chat_template: str | None = TINY_CHAT_TEMPLATE,
                         weight_std: float = 0.5, hidden_size: int = 32, num_heads: int = 4) -> Path:
    """A 2-layer, 32-wide Llama with random weights and a tiny byte-level BPE tokenizer, saved together.

    `hidden_size` / `num_heads` widen it where kernels need a real head size (vLLM: 256 / 4 gives 64).

    The tokenizer (~330 tokens: 256 bytes, a few merges learnt from four sentences, and the
    specials `<|pad|>`, `<|bos|>`, `<|end|>` = EOS / end of turn, `<|system|>`, `<|user|>`,
    `<|assistant|>`) encodes any text and decodes back to it. `chat_template` (default
    TINY_CHAT_TEMPLATE; None = none, a base model) is saved with it. Matrices are redrawn with std
    `weight_std` so the next-token distribution is far from uniform (greedy output depends on the
    prompt; samples depend on the seed). Loads with `AutoModelForCausalLM` / `AutoTokenizer`
    `.from_pretrained(path)`. About 0.2 MB on disk.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_TINY_LM_TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|end|>",
                                        pad_token="<|pad|>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    ids = {t: bpe.token_to_id(t) for t in ("<|pad|>", "<|bos|>", "<|end|>")}

    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
                         max_position_embeddings=512, pad_token_id=ids["<|pad|>"],
                         bos_token_id=ids["<|bos|>"], eos_token_id=ids["<|end|>"], tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() > 1:
                    parameter.normal_(0.0, weight_std)
    model.generation_config = GenerationConfig(bos_token_id=ids["<|bos|>"], eos_token_id=ids["<|end|>"],
                                               pad_token_id=ids["<|pad|>"])
    model.eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
