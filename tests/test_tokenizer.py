"""The runtime tokenizer (HF tokenizers + exported vocab) must match open_clip's exactly."""

import numpy as np
import pytest

from moderator.encode import ClipTokenizer, ModelDirectory

open_clip = pytest.importorskip("open_clip")

TEXTS = [
    "",
    " ",
    "a photo of a red circle",
    "A PHOTO OF A RED CIRCLE",
    "graphic violence, gore & blood!!!",
    "it's what they've said; I'd've done it. We'll see, you're right, he's gone, I'm here",
    "Café DÉJÀ vu — naïve résumé",
    "emoji 😀🔫💊 and flags 🇺🇸",
    "日本語のテキストと中文文本 한국어 텍스트",
    "Ελληνικά και русский текст",
    "mojibake: cafÃ© Ã¼ber",
    "&amp;lt;b&amp;gt;html&amp;lt;/b&amp;gt; &quot;quoted&quot; &#39;apos&#39;",
    "tabs\tand\nnewlines\r\n   collapse",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "<start_of_text> special tokens <end_of_text> in text",
    "ＦＵＬＬＷＩＤＴＨ ｆｕｌｌｗｉｄｔｈ",
    "zero\u200bwidth\u200djoiner and combining e\u0301",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a " * 100,
    "over-long text that keeps going " * 30,
    "𝓗𝓮𝓵𝓵𝓸 𝕨𝕠𝕣𝕝𝕕",
    "x" * 500,
]


@pytest.fixture(scope="module")
def tokenizer(random_model_dir):
    md = ModelDirectory(random_model_dir)
    return ClipTokenizer(md.manifest.tokenizer, md.file(md.manifest.tokenizer.file))


@pytest.mark.parametrize("context_length", [None, 77])
def test_matches_open_clip(random_model_dir, context_length):
    md = ModelDirectory(random_model_dir)
    spec = md.manifest.tokenizer
    if context_length:
        spec = spec.model_copy(update={"context_length": context_length})
    ours = ClipTokenizer(spec, md.file(spec.file))(TEXTS)
    theirs = open_clip.tokenize(TEXTS, context_length=spec.context_length).numpy()
    mismatches = [t for t, a, b in zip(TEXTS, ours, theirs) if not np.array_equal(a, b)]
    assert not mismatches, mismatches
    assert ours.dtype == np.int64 and ours.shape == (len(TEXTS), spec.context_length)


def test_over_long_text_ends_with_eot(tokenizer):
    ids = tokenizer(["word " * 200])[0]
    assert ids[0] == tokenizer.spec.sot_token_id
    assert ids[-1] == tokenizer.spec.eot_token_id
    assert (ids != 0).all()


def test_short_text_is_padded(tokenizer):
    ids = tokenizer("a cat")[0]
    eot = int(np.where(ids == tokenizer.spec.eot_token_id)[0][0])
    assert eot == 3 and (ids[eot + 1:] == 0).all()
