"""Factory and vehicle command speech for the trained fixture. The grammar, the sentence/voice split and the
espeak-ng synthesis live in megaedge/calibration/speech.py, because ``megaedge calibrate --preset eval`` builds its
held-out evaluation set from the same split; this module keeps the name training/train_fixture.py imports."""

from megaedge.calibration.speech import (  # noqa: F401
    TEST_ACCENTS, TEST_VARIANTS, TRAIN_ACCENTS, TRAIN_VARIANTS, Voice, is_test_sentence, number_words, random_voice,
    sentences, synthesize, vocabulary, voice_pool,
)
