"""The Rust CLIP tokenizers give the Python CLIPTokenizer's ids on the real 49,408-token vocabulary.

The vocabulary is CLIP's own BPE file as shipped in the open_clip_torch wheel (installed without
its dependencies, see requirements-nodeps.txt), turned into vocab.json / merges.txt by
`write_clip_vocab`; the ids of a few tokens are checked against CLIP's published vocabulary.
"""
import importlib.metadata
import random

import numpy as np
import pytest

from sdxl_jax.models.tokenizer import get_tokenizers, tokenize, tokenizers_from_files, write_clip_vocab

TAGS = ("1girl solo long_hair looking_at_viewer smile blush open_mouth short_hair blue_eyes "
        "brown_hair black_hair shirt thighhighs skirt hat dress red_eyes white_background "
        "masterpiece best_quality absurdres highres rating:general score_9 score_8_up newest "
        "very_aesthetic school_uniform holding sitting standing outdoors sky cloud day night "
        "cat_ears animal_ears tail wings sword gloves ribbon bow jewelry earrings necklace").split()
UNICODE = ["日本語のテキスト 猫耳", "初音ミク, ボーカロイド", "한국어 텍스트", "привет мир, девушка",
           "ΟΔΥΣΣΕΥΣ ΣΊΣΥΦΟΣ Σ", "café naïve résumé Ångström", "e\u0301 combining, ᾼ \u0345 x",
           "emoji 😀🎉👩‍👩‍👧 ok", "zero\u200bwidth\ufeff bom", "control\x00\x07\x1fchars",
           "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ", "nbsp\u00a0ideographic\u3000space", "x\ufffdy",
           "Straße İstanbul ǅ", "٣ ¹²³ ½ Ⅻ", "𠀀𪜀 cjk ext", "tab\tand\nnewline  spaces",
           "it's they're we've I'm you'll he'd", "wow!! amazing! !", "<|endoftext|> inside",
           "&amp; &lt;html&gt;", "\\(escaped\\) parens", "кошка:1.2", "a" * 200]


def _captions():
    rng = random.Random(0)
    caps = list(UNICODE)
    for i in range(300):
        n = rng.choice([1, 3, 8, 20, 45, 90])  # 45+ tags run past 77 tokens: chunking
        tags = [rng.choice(TAGS).replace("_", " " if i % 2 else "_") for _ in range(n)]
        for j in range(len(tags)):
            r = rng.random()
            if r < 0.1:
                tags[j] = f"({tags[j]}:{rng.choice(['1.2', '0.8', '1.05'])})"  # weight syntax
            elif r < 0.15:
                tags[j] = rng.choice(["[{}]", "{{{}}}", "(({}))", "{}!"]).format(tags[j])
            elif r < 0.2:
                tags[j] = tags[j] + " " + rng.choice(UNICODE[:8])
        caps.append(rng.choice([", ", ",", " "]).join(tags).title() if i % 7 == 0 else ", ".join(tags))
    return caps


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    bpe = importlib.metadata.distribution("open_clip_torch").locate_file(
        "open_clip/bpe_simple_vocab_16e6.txt.gz")
    return write_clip_vocab(str(bpe), str(tmp_path_factory.mktemp("clip_vocab")))


@pytest.fixture(scope="module")
def toks(clip_files):
    return {"fast": tokenizers_from_files(*clip_files, fast=True),
            "python": tokenizers_from_files(*clip_files, fast=False)}


def test_real_vocab_special_ids(toks):
    for tok_l, tok_g in toks.values():
        assert len(tok_l) == len(tok_g) == 49408
        assert (tok_l.bos_token_id, tok_l.eos_token_id, tok_l.pad_token_id) == (49406, 49407, 49407)
        assert (tok_g.bos_token_id, tok_g.eos_token_id, tok_g.pad_token_id) == (49406, 49407, 0)
    fast_l = toks["fast"][0]
    assert fast_l.is_fast and not toks["python"][0].is_fast
    # a few ids of CLIP's vocabulary, independent of both tokenizers
    assert fast_l.convert_tokens_to_ids(["a</w>", "photo</w>", "of</w>", "cat</w>", "girl</w>"]) == [
        320, 1125, 539, 2368, 1611]


def test_fast_ids_equal_python_on_captions(toks):
    caps = _captions()
    assert len(caps) > 300 and max(map(len, caps)) > 77 * 4
    for (fast, python) in zip(toks["fast"], toks["python"]):
        want = python(caps, add_special_tokens=False, verbose=False)["input_ids"]
        got = [e.ids for e in fast.backend_tokenizer.encode_batch(caps, add_special_tokens=False)]
        bad = [c for c, a, b in zip(caps, want, got) if a != b]
        assert not bad, f"{len(bad)} captions differ, first {bad[0]!r}"
        assert sum(len(w) > 75 for w in want) > 50  # long tag lists are really exercised


def test_fast_chunked_layout_equals_python(toks):
    caps = _captions()
    for (fast, python) in zip(toks["fast"], toks["python"]):
        a, b = tokenize(fast, caps, 3), tokenize(python, caps, 3)
        assert a.dtype == b.dtype == np.int32 and a.shape == (len(caps), 231)
        np.testing.assert_array_equal(a, b)


def test_fast_equals_python_on_sampled_code_points(toks):
    rng = random.Random(1)
    cps = rng.sample([c for c in range(0x20, 0x30000) if not 0xD800 <= c <= 0xDFFF], 1500)
    texts = [f"a{chr(c)}b {chr(c)}x A{chr(c)} {chr(c)}Σ" for c in cps]
    fast, python = toks["fast"][1], toks["python"][1]
    want = python(texts, add_special_tokens=False)["input_ids"]
    got = [e.ids for e in fast.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert [hex(c) for c, a, b in zip(cps, want, got) if a != b] == []


def test_tiny_tokenizers_are_fast_and_agree(toks):
    fast, python = get_tokenizers("tiny"), get_tokenizers("tiny", fast=False)
    caps = _captions()[:80]
    for f, p in zip(fast, python):
        assert f.is_fast
        np.testing.assert_array_equal(tokenize(f, caps, 2), tokenize(p, caps, 2))
