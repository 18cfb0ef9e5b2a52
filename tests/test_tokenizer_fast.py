"""The Rust CLIP tokenizers give the Python CLIPTokenizer's ids on the real 49,408-token vocabulary.

The expected ids are those of transformers 4.57's Python CLIPTokenizer (gone from transformers 5),
recorded in tests/golden/clip_python_tokenizer_ids.json.gz by tests/old_outputs.py.

The vocabulary is CLIP's own BPE file as shipped in the open_clip_torch wheel (installed without
its dependencies, see requirements-nodeps.txt), turned into vocab.json / merges.txt by
`write_clip_vocab`; the ids of a few tokens are checked against CLIP's published vocabulary.
"""
import gzip
import importlib.metadata
import json
import os
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


def captions():
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


def code_point_texts() -> list[str]:
    """1,500 code points below U+30000, each in four word contexts."""
    rng = random.Random(1)
    cps = rng.sample([c for c in range(0x20, 0x30000) if not 0xD800 <= c <= 0xDFFF], 1500)
    return [f"a{chr(c)}b {chr(c)}x A{chr(c)} {chr(c)}Σ" for c in cps]


CHUNKED = 40  # captions whose 3-chunk layout is recorded


@pytest.fixture(scope="module")
def python_ids():
    with gzip.open(os.path.join(os.path.dirname(__file__), "golden",
                                "clip_python_tokenizer_ids.json.gz"), "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    bpe = importlib.metadata.distribution("open_clip_torch").locate_file(
        "open_clip/bpe_simple_vocab_16e6.txt.gz")
    return write_clip_vocab(str(bpe), str(tmp_path_factory.mktemp("clip_vocab")))


@pytest.fixture(scope="module")
def toks(clip_files):
    return tokenizers_from_files(*clip_files)


def _ids(tok, texts):
    return [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def test_real_vocab_special_ids(toks):
    tok_l, tok_g = toks
    assert len(tok_l) == len(tok_g) == 49408
    assert (tok_l.bos_token_id, tok_l.eos_token_id, tok_l.pad_token_id) == (49406, 49407, 49407)
    assert (tok_g.bos_token_id, tok_g.eos_token_id, tok_g.pad_token_id) == (49406, 49407, 0)
    # a few ids of CLIP's vocabulary, independent of the tokenizer
    assert tok_l.convert_tokens_to_ids(["a</w>", "photo</w>", "of</w>", "cat</w>", "girl</w>"]) == [
        320, 1125, 539, 2368, 1611]


def test_ids_equal_python_on_captions(toks, python_ids):
    caps = captions()
    assert len(caps) > 300 and max(map(len, caps)) > 77 * 4
    # bigG's pad token "!" is a special token there: "!!" is two of them, not one BPE token
    for tok, want in zip(toks, (python_ids["captions_l"], python_ids["captions_g"])):
        got = _ids(tok, caps)
        bad = [c for c, a, b in zip(caps, want, got) if a != b]
        assert not bad, f"{len(bad)} captions differ, first {bad[0]!r}"
        assert sum(len(w) > 75 for w in want) > 50  # long tag lists are really exercised


def test_chunked_layout_equals_python(toks, python_ids):
    caps = captions()[:CHUNKED]
    for tok, key in zip(toks, ("chunked_l", "chunked_g")):
        got = tokenize(tok, caps, 3)
        assert got.dtype == np.int32 and got.shape == (CHUNKED, 231)
        np.testing.assert_array_equal(got, np.asarray(python_ids[key]))


def test_ids_equal_python_on_sampled_code_points(toks, python_ids):
    texts = code_point_texts()
    got = _ids(toks[1], texts)
    assert [t[1] for t, a, b in zip(texts, python_ids["code_points"], got) if a != b] == []


def test_tiny_tokenizers_equal_python(python_ids):
    caps = captions()[:80]
    for tok, key in zip(get_tokenizers("tiny"), ("tiny_l", "tiny_g")):
        assert _ids(tok, caps) == python_ids[key]


def test_saved_folder_loads_back(toks, tmp_path):
    from sdxl_jax.models.tokenizer import ClipTokenizer
    caps = captions()[:50]
    for tok, sub in zip(toks, ("tokenizer", "tokenizer_2")):
        tok.save_pretrained(str(tmp_path / sub))
        again = ClipTokenizer.from_folder(str(tmp_path / sub))
        assert again.pad_token_id == tok.pad_token_id
        np.testing.assert_array_equal(tokenize(again, caps, 2), tokenize(tok, caps, 2))
