import pytest

from megaedge.runtime.text import max_new_tokens_for, parse_asr_output

CASES = [
    "language English<asr_text>Open valve three.",
    "language None<asr_text>",
    "  language Chinese<asr_text>打开三号阀门  ",
    "no marker at all",
    "",
    "language German\n<asr_text>Ventil auf",
]


@pytest.mark.parametrize("raw", CASES)
def test_parser_agrees_with_transformers(raw):
    from transformers.models.qwen3_asr.processing_qwen3_asr import _parse_single_output

    ref = _parse_single_output(raw)
    ours = parse_asr_output(raw)
    assert (ours.language, ours.text) == (ref["language"], ref["transcription"])


def test_budget_grows_with_audio_and_beats_fixed_256_on_long_speech():
    assert max_new_tokens_for(0.2) == 32
    assert max_new_tokens_for(60.0) > 256 and max_new_tokens_for(60.0) >= 60 * 3.8 * 2
