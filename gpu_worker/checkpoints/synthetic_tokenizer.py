"""A small synthetic byte-level BPE `tokenizer.json` for tiny test checkpoints (spec §10).

The published tokenizer is the Llama 3.2 one (not redistributable), so fixtures use this stand-in
with the same behaviour: byte-level alphabet, no prefix space, a post-processor that prepends
`<|begin_of_text|>` only (so the prompt builder's "BOS present, append EOS" path runs). Ids: bytes
0..255, BOS 256, EOS 257, then merges learned deterministically from the corpus below.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
BOS_ID = 256
EOS_ID = 257
NUM_MERGES = 64  # ids 258..321, below the tiny text_vocab_size of 384

_CORPUS = """\
<tag>pop,piano,happy,wedding</tag> <tag>rock,guitar,energetic</tag> <tag>ballad,female,sad</tag>
[intro]
[verse]
the morning light is on the water, we sing along the road
[prechorus]
hold on, hold on, the night is coming home
[chorus]
la la la, we are dancing in the rain, singing all the way
[bridge]
and the stars are falling down again
[outro]
"""


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map, which ByteLevel uses
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_UNICODE = _bytes_to_unicode()


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties: lexicographically first)."""
    counts = Counter(tuple(word) for word in words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in counts.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in counts.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        counts = merged
    return merges


def build_synthetic_tokenizer(num_merges: int = NUM_MERGES) -> Tokenizer:
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(_CORPUS)]
    merges = _learn_merges(words, num_merges)

    vocab = {_BYTE_TO_UNICODE[b]: b for b in range(256)}
    vocab[BOS_TOKEN] = BOS_ID
    vocab[EOS_TOKEN] = EOS_ID
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    # the specials already have ids in the vocabulary, so registering them keeps 256 / 257
    tokenizer.add_special_tokens([AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[(BOS_TOKEN, BOS_ID)])
    return tokenizer


def write_synthetic_tokenizer(path: Path | str) -> None:
    Path(path).write_text(build_synthetic_tokenizer().to_str(pretty=True))
