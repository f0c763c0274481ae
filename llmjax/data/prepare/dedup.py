"""The dedup curation stages: what each document contributes (computed in the workers) and the global decision.

`exact_dedup`: the 128-bit BLAKE2b hash of the normalised text (Unicode NFKC, case-folded,
whitespace runs collapsed to one space, trimmed). `near_dedup`: a MinHash signature
(datasketch, `affine32` scheme, a fixed seed, so every process computes the same one) of the
set of word n-grams of the normalised text (words: runs of letters, digits and `_`); a text of
fewer than n words is one shingle. The decision (`ExactIndex`, `NearIndex`) walks the documents
in corpus order and keeps the first of each group: a document is a duplicate if its hash was
kept before (exact), or if a kept document's estimated Jaccard similarity (the share of equal
signature entries) is at least `curate.near_dedup.threshold`. Candidates come from datasketch's
LSH index, its bands chosen for recall (false negative weight 0.95) since every candidate is checked
against the signatures.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np
import numpy.typing as npt

from llmjax.config.curation import NearDedupConfig

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_SEED = 1  # MinHash permutations: part of the format of the signatures, never a config key
_CHUNK = 16384  # shingles hashed per call (bounds the num_perm x chunk work array)


def normalise(text: str) -> str:
    """The text compared by the dedup stages: NFKC, case-folded, whitespace runs as one space, trimmed."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(text: str) -> bytes:
    """16 bytes: the BLAKE2b hash of `normalise(text)`."""
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int) -> list[bytes]:
    """The word n-grams of `normalise(text)` as UTF-8 (one shingle of all words if there are fewer than n; none
    for a text without words)."""
    words = _WORD.findall(normalise(text))
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")] if words else []
    return [" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)]


def jaccard(a: str, b: str, n: int = 5) -> float:
    """The exact Jaccard similarity of the two texts' shingle sets (what the signatures estimate)."""
    sa, sb = set(shingles(a, n)), set(shingles(b, n))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


class Signer:
    """MinHash signatures (uint32 [num_perm]) of documents' shingles; every instance with the same `num_perm` gives
    the same signature for the same text."""

    def __init__(self, cfg: NearDedupConfig):
        from datasketch import MinHash  # imported here: scipy.integrate (datasketch.lsh) takes ~1 s to import

        self.ngram, self.num_perm = cfg.ngram, cfg.num_perm
        self._template = MinHash(num_perm=cfg.num_perm, seed=_SEED, scheme="affine32", hashfunc=zlib.crc32)

    def signature(self, text: str) -> npt.NDArray[np.uint32] | None:
        """The signature of `text`, or None for a text without words (never a near duplicate)."""
        sh = shingles(text, self.ngram)
        if not sh:
            return None
        m = self._template.copy()
        for k in range(0, len(sh), _CHUNK):
            m.update_batch(sh[k:k + _CHUNK])
        return np.asarray(m.hashvalues, dtype=np.uint32)


class ExactIndex:
    """The exact hashes kept so far."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, key: bytes) -> bool:
        """True if `key` was kept before; else keeps it."""
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


class NearIndex:
    """The signatures kept so far, in datasketch's LSH index."""

    def __init__(self, cfg: NearDedupConfig):
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.num_perm = cfg.threshold, cfg.num_perm
        self._MinHash = MinHash
        self._lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=(0.05, 0.95))
        self._kept: list[npt.NDArray[np.uint32]] = []
        self._perm = MinHash(num_perm=cfg.num_perm, seed=_SEED, scheme="affine32").permutations

    def is_duplicate(self, sig: npt.NDArray[np.uint32] | None) -> bool:
        """True if a kept signature matches `sig` on at least `threshold` of its entries; else keeps `sig`."""
        if sig is None:
            return False
        m = self._MinHash(seed=_SEED, scheme="affine32", hashvalues=sig, permutations=self._perm)
        for key in sorted(self._lsh.query(m)):
            if np.count_nonzero(self._kept[key] == sig) >= self.threshold * self.num_perm:
                return True
        self._lsh.insert(len(self._kept), m, check_duplication=False)
        self._kept.append(sig)
        return False
