"""CLIP tokenizers for both text towers, and METHODS §8 long-caption chunking.

Without pretrained weights (the tiny preset, tests, the offline demo) nothing can be downloaded,
so a small byte-level CLIP BPE vocabulary is generated deterministically: CLIP's 512 byte
symbols (plain and word-final "</w>"), merges that make each demo word a single token, then
<|startoftext|> and <|endoftext|> as the two highest ids, exactly as in CLIP's real vocabulary
(SDXL's configs pool the EOS state at argmax(ids), which relies on EOS being the highest id).
Any other text still tokenizes, into byte-level pieces.

The tokenizers are Rust `tokenizers` BPE models (`ClipTokenizer`), normalised and pre-tokenised so
the ids equal those of transformers' former Python `CLIPTokenizer` this project used at first
(tests/test_tokenizer_fast.py checks them against that tokenizer's recorded ids): the Python one
ran ~950 captions/s per tower in the loader, the Rust one many times that.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import unicodedata

import numpy as np

from sdxl_jax.config_sections import offline_preset

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


# ---- the Rust tokenizer, made to give the Python CLIPTokenizer's ids ------------------------
# transformers' (4.x, Python) CLIPTokenizer without ftfy (not installed here) normalises with
# BERT's BasicTokenizer: drop NUL, U+FFFD and every "C*" category character (tab/newline/CR become
# spaces), put spaces around CJK ideographs, NFC, split on whitespace, Python's str.lower() (with
# its final-sigma rule); then CLIP's regex (IGNORECASE) and byte-level BPE. The converted Rust
# tokenizer (CLIPTokenizerFast; transformers 5's CLIPTokenizer) instead does NFC, whitespace, a
# per-character lowercase, so it differs on CJK, control and zero-width characters, final sigma
# and U+0345. Measured on every code point below U+30000 in four word contexts: 271 of the
# 145,854 assigned ones differed without the normaliser below; with it, none
# (tests/test_tokenizer_fast.py checks a sample of 1,500 and ~330 captions). The
# character classes come from Python's own unicodedata, not the regex engine's newer Unicode.

# The CJK blocks BasicTokenizer._is_chinese_char pads with spaces (BERT's ranges).
_CJK_CLASS = (r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}"
              r"\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}]")
# CLIP's pre-tokenizer pattern (as in CLIPTokenizer and the converted fast tokenizer).
_CLIP_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# Word_Break MidLetter, MidNumLet and Single_Quote: with Mn, Me, Cf, Lm, Sk, Case_Ignorable.
_WB_CASE_IGNORABLE = (0x27, 0x2E, 0x3A, 0xB7, 0x387, 0x55F, 0x5F4, 0x2018, 0x2019, 0x2024, 0x2027,
                      0xFE13, 0xFE52, 0xFE55, 0xFF07, 0xFF0E, 0xFF1A)


def _char_class(codepoints) -> str:
    """A regex class of sorted code points, as ranges."""
    ranges: list[list[int]] = []
    for cp in codepoints:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "[" + "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}"
                         for a, b in ranges) + "]"


@functools.lru_cache(maxsize=None)
def _unicode_classes() -> dict[str, str]:
    """Regex classes from this Python's unicodedata, so a newer Unicode in the Rust regex engine
    cannot make the two tokenizers disagree: what BasicTokenizer._clean_text drops; Cased minus
    Case_Ignorable; Case_Ignorable (str.lower()'s final-sigma test skips the latter)."""
    dropped, cased, ignorable = [], [], []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue  # surrogates never reach a Rust string
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cp in (0, 0xFFFD) or (cat[0] == "C" and cp not in (9, 10, 13)):
            dropped.append(cp)
        is_ignorable = cat in ("Mn", "Me", "Cf", "Lm", "Sk") or cp in _WB_CASE_IGNORABLE
        if is_ignorable:
            ignorable.append(cp)
        elif ch.islower() or ch.isupper() or ch.istitle():
            cased.append(cp)
    return {"dropped": _char_class(dropped), "cased": _char_class(cased),
            "ignorable": _char_class(ignorable)}


def _final_sigma_pattern() -> str:
    """Σ in Python's Final_Sigma context: after a cased letter and case-ignorables, not before
    case-ignorables and a cased letter (Objects/unicodeobject.c handle_capital_sigma)."""
    u = _unicode_classes()
    # Σ first, so the engine looks for Σ rather than trying the look-behind at every position
    return (f"\\x{{3A3}}(?<={u['cased']}{u['ignorable']}*\\x{{3A3}})"
            f"(?!{u['ignorable']}*{u['cased']})")


def _backend(vocab: dict, merges: list, bos: int, eos: int, pad_token: str):
    """CLIP's byte-level BPE as a Rust `tokenizers.Tokenizer`, normalised and pre-tokenised like
    the Python CLIPTokenizer; encodes BOS … EOS when asked for special tokens. BOS, EOS and the
    pad token are special tokens, matched whole in any text (so with bigG's pad token "!", "!!"
    is two "!" tokens, as transformers' tokenizers have always split it)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(_unicode_classes()["dropped"]), ""),
        normalizers.NFC(),
        normalizers.Replace(Regex(_final_sigma_pattern()), "\u03c2"),
        normalizers.Lowercase(),
        # CLIP's IGNORECASE regex matches U+0345 with neither [\p{L}] nor its complement (it
        # case-folds to iota), so the Python tokenizer skips it like a space.
        normalizers.Replace("\u0345", " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CJK_CLASS), behavior="isolated"),
        pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((EOS, eos), (BOS, bos), trim_offsets=False,
                                                      add_prefix_space=False)
    tok.add_special_tokens(list(dict.fromkeys([BOS, EOS, pad_token])))
    return tok


class ClipTokenizer:
    """One SDXL tower's CLIP tokenizer: the vocabulary, the pad token, the Rust tokenizer.

    `save_pretrained` writes the folder layout of SDXL's tokenizer/ and tokenizer_2/ (vocab.json,
    merges.txt, tokenizer_config.json, special_tokens_map.json), which transformers'
    CLIPTokenizer loads.
    """
    is_fast = True

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str):
        if pad_token not in vocab:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.vocab, self.merges, self.pad_token = vocab, [tuple(m) for m in merges], pad_token
        self.bos_token_id, self.eos_token_id = vocab[BOS], vocab[EOS]
        self.pad_token_id = vocab[pad_token]
        self.backend_tokenizer = _backend(vocab, self.merges, self.bos_token_id,
                                          self.eos_token_id, pad_token)

    @classmethod
    def from_files(cls, vocab_file: str, merges_file: str, pad_token: str) -> "ClipTokenizer":
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines
                  if line and not line.startswith("#version")]
        return cls(vocab, merges, pad_token)

    @classmethod
    def from_folder(cls, folder: str) -> "ClipTokenizer":
        """A tokenizer/ folder as diffusers SDXL folders (and `save_pretrained`) hold it."""
        files = [os.path.join(folder, n) for n in ("vocab.json", "merges.txt")]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{folder}: not a CLIP tokenizer folder (missing {missing})")
        return cls.from_files(*files, _pad_token(folder))

    def __len__(self) -> int:
        return len(self.vocab)

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.vocab[t] for t in tokens]

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of `text` (no BOS / EOS)."""
        return self.backend_tokenizer.encode(text, add_special_tokens=False).tokens

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in self.merges) + "\n")
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(special, f, indent=2)
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": SEQ_LEN,
                       "do_lower_case": True, "clean_up_tokenization_spaces": True,
                       "add_prefix_space": False, "errors": "replace", **special}, f, indent=2)


def _pad_token(folder: str) -> str:
    """The pad token a tokenizer folder names (special_tokens_map / tokenizer_config); EOS when
    neither does (CLIP's own default)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                pad = json.load(f).get("pad_token")
            if pad is not None:
                return pad["content"] if isinstance(pad, dict) else pad
    return EOS


def _load_pretrained(pretrained: str):
    if os.path.isdir(pretrained):
        folders = [os.path.join(pretrained, sub) for sub in ("tokenizer", "tokenizer_2")]
        missing = [f for f in folders if not os.path.isdir(f)]
        if missing:
            raise FileNotFoundError(
                f"model.pretrained={pretrained!r} is a folder but lacks {missing}; point it at a "
                "diffusers SDXL folder (with tokenizer/ and tokenizer_2/)")
        return tuple(ClipTokenizer.from_folder(f) for f in folders)
    source = pretrained
    if os.path.isfile(pretrained):
        # Single-file checkpoints carry no tokenizer; SDXL's are the stock CLIP ones.
        log.info("%s holds no tokenizer; using %s's tokenizers", pretrained, SDXL_HUB_ID)
        source = SDXL_HUB_ID
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(source, allow_patterns=["tokenizer/*", "tokenizer_2/*"])
        return tuple(ClipTokenizer.from_folder(os.path.join(folder, sub))
                     for sub in ("tokenizer", "tokenizer_2"))
    except Exception as e:  # huggingface_hub raises its own errors for offline / missing repos
        raise OSError(
            f"could not load the SDXL tokenizers from {source!r} (model.pretrained={pretrained!r})"
            ": give a local diffusers folder, or be online for a Hub id") from e


def write_clip_vocab(bpe_path: str, out_dir: str) -> tuple[str, str]:
    """vocab.json and merges.txt of CLIP's real 49,408-token vocabulary from its BPE merge list
    (`bpe_simple_vocab_16e6.txt.gz`, as shipped by OpenAI CLIP and open_clip) built the way CLIP
    does: the 256 byte symbols, the same with "</w>", one token per merge, BOS, EOS."""
    import gzip
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    os.makedirs(out_dir, exist_ok=True)
    vocab_file, merges_file = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


def tokenizers_from_files(vocab_file: str, merges_file: str):
    """(CLIP-L, bigG) tokenizers of one CLIP vocabulary: CLIP-L pads with EOS, bigG with "!"."""
    return (ClipTokenizer.from_files(vocab_file, merges_file, EOS),
            ClipTokenizer.from_files(vocab_file, merges_file, PAD_G))


def get_tokenizers(preset: str, pretrained: str = ""):
    """(tokenizer for CLIP-L, tokenizer for bigG).

    pretrained "" (or a CPU-sized preset: tiny, micro): the generated offline vocabulary; CLIP-L's
    pads with EOS, bigG's with "!" (id 0) like SDXL's tokenizer / tokenizer_2. Otherwise a diffusers
    folder's tokenizer/ and tokenizer_2/ (a Hub id when online).
    """
    if offline_preset(preset) or not pretrained:
        folder = tiny_tokenizer_dir()
        return tokenizers_from_files(os.path.join(folder, "vocab.json"),
                                     os.path.join(folder, "merges.txt"))
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
    out[:, :, 1] = eos  # chunks no token reaches stay empty captions
    ids = _token_ids(tokenizer, list(captions))
    for b, caption_ids in enumerate(ids):
        n = min(len(caption_ids), max_chunks * CHUNK_TOKENS)
        if not n:
            continue
        # token k goes to chunk k // 75, position 1 + k % 75; each used chunk's EOS follows it
        k = np.arange(n)
        out[b, k // CHUNK_TOKENS, 1 + k % CHUNK_TOKENS] = caption_ids[:n]
        last = np.arange((n - 1) // CHUNK_TOKENS + 1)
        fill = np.minimum(n - last * CHUNK_TOKENS, CHUNK_TOKENS)
        out[b, last, 1 + fill] = eos
    return out.reshape(len(captions), max_chunks * SEQ_LEN)


def _token_ids(tokenizer, captions: list[str]) -> list[list[int]]:
    """Token ids of each caption without BOS/EOS, from the Rust batch encoder (GIL released; the
    _fast variant tracks no offsets)."""
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(
        captions, add_special_tokens=False)]
