import random

import pytest

from megaedge.runtime.text import collapse_repeats, max_new_tokens_for, parse_asr_output

CASES = [
    "language English<asr_text>Open valve three.",
    "language None<asr_text>",
    "  language Chinese<asr_text>打开三号阀门  ",
    "no marker at all",
    "",
    "language German\n<asr_text>Ventil auf",
    "language English<asr_text>" + "open valve " * 25,
    "language English<asr_text>stop" + "!" * 40 + " now",
    "system\nuser\nassistant\nlanguage English<asr_text>open",
    "None<asr_text>hi",
    "language none\nx<asr_text>hi",
    "language NONE<asr_text>",
]


@pytest.mark.parametrize("raw", CASES)
def test_parser_agrees_with_transformers(raw):
    from transformers.models.qwen3_asr.processing_qwen3_asr import _parse_single_output

    ref = _parse_single_output(raw)
    ours = parse_asr_output(raw)
    assert (ours.language, ours.text) == (ref["language"], ref["transcription"])


def _degenerate(rng: random.Random) -> str:
    alphabet = rng.choice(["ab", "abc", "a b", "xyz. ", "language English<asr_text>", "打开阀门"])
    parts = []
    for _ in range(rng.randint(0, 6)):
        unit = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        parts.append(unit * (rng.randint(1, 30) if rng.random() < 0.5 else 1))
    return "".join(parts)


def test_repetition_rule_is_the_reference_parsers():
    from transformers.models.qwen3_asr.processing_qwen3_asr import _detect_and_fix_repetitions

    rng = random.Random(7)
    for _ in range(300):
        text = _degenerate(rng)
        assert collapse_repeats(text) == _detect_and_fix_repetitions(text), text
    assert collapse_repeats("ab" * 19) == "ab" * 19 and collapse_repeats("ab" * 20) == "ab"


def test_budget_grows_with_audio_and_beats_fixed_256_on_long_speech():
    assert max_new_tokens_for(0.2) == 32
    assert max_new_tokens_for(60.0) > 256 and max_new_tokens_for(60.0) >= 60 * 3.8 * 2


def test_stream_partials_skip_the_repetition_rule_so_committed_text_only_grows():
    grown = ["language English<asr_text>" + "go " * n for n in (19, 20, 21)]
    partial = [parse_asr_output(text, collapse=False).text for text in grown]
    assert all(b.startswith(a) for a, b in zip(partial, partial[1:]))
    assert parse_asr_output(grown[2]).text == "go go"  # 20 copies of "go " and the stripped last one
