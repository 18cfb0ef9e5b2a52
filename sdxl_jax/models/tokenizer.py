"""CLIP tokenizers for both text towers, and METHODS §8 long-caption chunking.

Without pretrained weights (the tiny preset, tests, the offline demo) nothing can be downloaded,
so a small byte-level CLIP BPE vocabulary is generated deterministically: CLIP's 512 byte
symbols (plain and word-final "</w>"), merges that make each demo word a single token, then
<|startoftext|> and <|endoftext|> as the two highest ids, exactly as in CLIP's real vocabulary
(SDXL's configs pool the EOS state at argmax(ids), which relies on EOS being the highest id).
Any other text still tokenizes, into byte-level pieces.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile

import numpy as np

log = logging.getLogger(__name__)

SEQ_LEN = 77  # CLIP context: BOS + 75 tokens + EOS
CHUNK_TOKENS = SEQ_LEN - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# SDXL's tokenizer_2 (OpenCLIP bigG) pads with "!", id 0; tokenizer (CLIP-L) pads with EOS.
PAD_G = "!"
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"

# Words of the demo captions and common tag vocabulary. Digits never need entries: CLIP's
# pre-tokenizer splits every digit into its own token ("1girl" → "1", "girl").
_WORDS = """
a an the of on in with and or no not at to from by
black white red green blue yellow orange purple pink brown gray grey cyan magenta gold silver
dark light bright pale deep vivid pastel colorful monochrome completely fully solid plain simple
background backgrounds foreground gradient pattern texture noise
circle circles square squares triangle triangles rectangle rectangles star stars ring rings
dot dots line lines stripe stripes shape shapes cross hexagon diamond heart hearts
girl girls boy boys person people solo multiple humans animal cat cats dog dogs
small large big tiny huge medium
left right top bottom center centered middle corner upper lower
one two three four five many several single pair
image picture photo drawing painting illustration sketch art color colors colour colours
masterpiece best high low quality absurdres rating general sensitive questionable explicit safe
year newest oldest highres lowres detailed blurry sharp
""".split()


@functools.lru_cache(maxsize=None)
def _tiny_merges() -> tuple[tuple[str, str], ...]:
    """Merges in rank order such that every word of _WORDS is one token.

    New merges are appended after all existing ones; a word already reduced to one symbol has
    no pairs left, so later merges can never split it again.
    """
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for word in sorted(set(_WORDS)):
        symbols = _bpe(word, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _bpe(word, ranks)
    return tuple(merges)


def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge every occurrence of the lowest-ranked pair."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _byte_symbols() -> list[str]:
    """The 256 byte symbols in CLIP's order (printable bytes first, the rest shifted to 256+)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


@functools.lru_cache(maxsize=None)
def _tiny_vocab() -> dict[str, int]:
    tokens = _byte_symbols()
    tokens += [s + "</w>" for s in tokens]
    tokens += ["".join(pair) for pair in _tiny_merges()]
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def tiny_vocab_size() -> int:
    """Vocabulary size of the generated tokenizer (the tiny CLIP configs' vocab_size)."""
    return len(_tiny_vocab())


def _cache_root() -> str:
    root = os.environ.get("SDXL_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdxl_jax")
    return root


def tiny_tokenizer_dir() -> str:
    """Write (once) and return the folder holding the generated vocab.json and merges.txt."""
    vocab_json = json.dumps(_tiny_vocab(), ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(p) for p in _tiny_merges()) + "\n"
    digest = hashlib.sha256((vocab_json + merges_txt).encode()).hexdigest()[:12]
    root = _cache_root()
    target = os.path.join(root, f"tiny_clip_tokenizer_{digest}")
    if os.path.isfile(os.path.join(target, "merges.txt")):
        return target
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tok_", dir=root)
    with open(os.path.join(staging, "vocab.json"), "w", encoding="utf-8") as f:
        f.write(vocab_json)
    with open(os.path.join(staging, "merges.txt"), "w", encoding="utf-8") as f:
        f.write(merges_txt)
    try:
        os.replace(staging, target)  # atomic; another process may have won the race
    except OSError:
        for name in ("vocab.json", "merges.txt"):
            os.remove(os.path.join(staging, name))
        os.rmdir(staging)
    return target


def _load_pretrained(pretrained: str):
    from sdxl_jax.models.hf import CLIPTokenizer

    if os.path.isdir(pretrained):
        folders = [os.path.join(pretrained, sub) for sub in ("tokenizer", "tokenizer_2")]
        missing = [f for f in folders if not os.path.isdir(f)]
        if missing:
            raise FileNotFoundError(
                f"model.pretrained={pretrained!r} is a folder but lacks {missing}; point it at a "
                "diffusers SDXL folder (with tokenizer/ and tokenizer_2/)")
        return tuple(CLIPTokenizer.from_pretrained(f) for f in folders)
    source = pretrained
    if os.path.isfile(pretrained):
        # Single-file checkpoints carry no tokenizer; SDXL's are the stock CLIP ones.
        log.info("%s holds no tokenizer; using %s's tokenizers", pretrained, SDXL_HUB_ID)
        source = SDXL_HUB_ID
    try:
        return tuple(CLIPTokenizer.from_pretrained(source, subfolder=sub)
                     for sub in ("tokenizer", "tokenizer_2"))
    except OSError as e:
        raise OSError(
            f"could not load the SDXL tokenizers from {source!r} (model.pretrained={pretrained!r})"
            ": give a local diffusers folder, or be online for a Hub id") from e


def get_tokenizers(preset: str, pretrained: str = ""):
    """(tokenizer for CLIP-L, tokenizer for bigG).

    pretrained "" (or preset "tiny"): the generated offline vocabulary; CLIP-L's pads with EOS,
    bigG's with "!" (id 0) like SDXL's tokenizer / tokenizer_2. Otherwise a diffusers folder's
    tokenizer/ and tokenizer_2/ (a Hub id when online).
    """
    if preset == "tiny" or not pretrained:
        from sdxl_jax.models.hf import CLIPTokenizer

        folder = tiny_tokenizer_dir()
        files = dict(vocab_file=os.path.join(folder, "vocab.json"),
                     merges_file=os.path.join(folder, "merges.txt"), model_max_length=SEQ_LEN)
        return CLIPTokenizer(**files, pad_token=EOS), CLIPTokenizer(**files, pad_token=PAD_G)
    return _load_pretrained(pretrained)


def tokenize(tokenizer, captions: list[str], max_chunks: int) -> np.ndarray:
    """Token ids (B, max_chunks·77) int32: each caption cut into 75-token chunks (METHODS §8).

    Every chunk is BOS + ≤75 tokens + EOS, padded to 77 with the tokenizer's pad id; tokens past
    max_chunks·75 are dropped; unused chunks look like an empty caption (BOS, EOS, padding).
    """
    if isinstance(captions, str):
        raise TypeError("tokenize() takes a list of captions, not a single string")
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    out = np.full((len(captions), max_chunks, SEQ_LEN), pad, dtype=np.int32)
    out[:, :, 0] = bos
    if not captions:
        return out.reshape(0, max_chunks * SEQ_LEN)
    # verbose=False: long captions are expected here, not worth the "too long" warning.
    ids = tokenizer(list(captions), add_special_tokens=False, verbose=False)["input_ids"]
    for b, caption_ids in enumerate(ids):
        caption_ids = caption_ids[:max_chunks * CHUNK_TOKENS]
        for c in range(max_chunks):
            chunk = caption_ids[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
            out[b, c, 1:1 + len(chunk)] = chunk
            out[b, c, 1 + len(chunk)] = eos
    return out.reshape(len(captions), max_chunks * SEQ_LEN)
