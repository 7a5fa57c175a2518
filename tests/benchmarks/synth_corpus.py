"""A synthetic, OpenWebText-shaped corpus for BPE and encoding benchmarks at scale (no OWT offline).

    python tests/benchmarks/synth_corpus.py --size 100M --out /tmp/synth_100M.txt [--seed 0] [--words 3000000]

Documents of sentences separated by `<|endoftext|>`. Words are drawn from a Zipf distribution
(exponent --zipf, default 1.1) over --words random "words" (letters, lengths 1-14, some capitalized),
with punctuation, numbers (random, so many distinct ones), quotes, contractions, newlines and
paragraph breaks. A larger file keeps meeting new rare words, as real corpora do (Heaps' law):
the defaults give about 650K distinct GPT-2 pre-tokens at 100 MB. Deterministic for a given seed
and size. Write big files under /tmp, never into the repository.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

EOT = "<|endoftext|>"
LETTERS = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
LETTER_P = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
                     1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
PUNCT = np.array([",", ".", ",", ".", "!", "?", ";", ":", " -", "'s", "n't", "'ll", " (", ")", '"', ' "'], dtype=object)


def parse_size(s: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    s = s.strip().upper().rstrip("B")
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)


def make_words(rng: np.random.Generator, n: int) -> np.ndarray:
    lengths = np.clip(rng.geometric(0.22, size=n), 1, 14)
    letters = rng.choice(LETTERS, size=int(lengths.sum()), p=LETTER_P / LETTER_P.sum()).tobytes().decode("ascii")
    words, pos = [], 0
    caps = rng.random(n) < 0.08
    for k, c in zip(lengths.tolist(), caps.tolist()):
        w = letters[pos:pos + k]
        pos += k
        words.append(w.capitalize() if c else w)
    return np.array(words, dtype=object)


def generate(
    out, size: int, seed: int = 0, n_words: int = 3_000_000, zipf: float = 1.1, block_words: int = 1 << 19
) -> int:
    """Write about `size` bytes to the binary file `out`; returns the bytes written."""
    rng = np.random.default_rng(seed)
    words = make_words(rng, n_words)
    weights = 1.0 / np.arange(1, n_words + 1) ** zipf
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    written = 0
    while written < size:
        idx = np.searchsorted(cdf, rng.random(block_words))
        toks = words[idx]
        r = rng.random(block_words)
        parts = []
        for w, u in zip(toks.tolist(), r.tolist()):
            if u < 0.035:
                parts.append(w + PUNCT[int(u * 1000) % len(PUNCT)])
            elif u < 0.045:
                parts.append(str(int(u * 1e9) % (10 ** (1 + int(u * 1e4) % 6))))
            elif u < 0.052:
                parts.append(w + ".\n")
            elif u < 0.0535:
                parts.append(w + ".\n\n")
            elif u < 0.0545:
                parts.append(w + "." + EOT)
            else:
                parts.append(w)
        block = " ".join(parts).replace("\n ", "\n").replace(EOT + " ", EOT) + " "
        data = block.encode("utf-8")
        if written + len(data) > size:
            data = data[: size - written]
            data = data[: data.rfind(b" ") + 1] or data
        out.write(data)
        written += len(data)
        if len(data) == 0:
            break
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", required=True, help="bytes, e.g. 100M or 1G")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--words", type=int, default=3_000_000, help="distinct random words to draw from")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of word frequencies")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with open(args.out, "wb") as f:
        n = generate(f, parse_size(args.size), args.seed, args.words, args.zipf)
    print(f"wrote {n:,} bytes to {args.out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
