"""Deduplication as a privacy defence: exact line dedup and MinHash near-duplicate removal
(Kandpal et al. 2022, "Deduplicating Training Data Mitigates Privacy Risks in Language Models")."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmlab.errors import ConfigError
from llmlab.security.privacy.common import Callback, PrivacyError, Stage

MERSENNE = np.uint64(4294967311)  # a prime just above 2^32


def _shingles(doc: str, n: int) -> np.ndarray:
    """32-bit hashes (CRC-32) of the document's word n-grams (of the whole text when shorter)."""
    words = re.findall(r"\S+", doc.lower())
    grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    return np.unique(np.array([zlib.crc32(g.encode()) for g in grams], dtype=np.uint64))


def minhash_signatures(docs: Sequence[str], n: int = 5, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """MinHash signatures (D, num_perm): sig_i(A) = min_{s in A} (a_i h(s) + b_i) mod p over the word
    n-gram shingles A of each document (Broder 1997); Pr[sig_i(A) = sig_i(B)] = Jaccard(A, B)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**32 - 1, num_perm, dtype=np.uint64)
    b = rng.integers(0, 2**32 - 1, num_perm, dtype=np.uint64)
    sigs = np.empty((len(docs), num_perm), dtype=np.uint64)
    for i, d in enumerate(docs):
        h = _shingles(d, n)  # (S,)
        sigs[i] = ((h[:, None] * a[None, :] + b[None, :]) % MERSENNE).min(axis=0)  # no overflow: h, a, b < 2^32
    return sigs


def near_duplicates(docs: Sequence[str], threshold: float = 0.8, n: int = 5, num_perm: int = 128,
                    bands: int = 32) -> list[tuple[int, int, float]]:
    """Pairs (earlier, later, estimated Jaccard) of near-duplicate documents: candidates from LSH (bands of
    num_perm/bands rows; a pair collides in some band with probability 1 - (1 - J^r)^b), kept when the
    fraction of equal MinHash values reaches `threshold`."""
    if num_perm % bands:
        raise ConfigError(f"num_perm {num_perm} is not divisible by bands {bands}")
    sigs = minhash_signatures(docs, n, num_perm)
    r = num_perm // bands
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for i in range(len(docs)):
            buckets.setdefault(sigs[i, band * r:(band + 1) * r].tobytes(), []).append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    pairs.add((members[x], members[y]))
    out = []
    for i, j in sorted(pairs):
        jac = float((sigs[i] == sigs[j]).mean())
        if jac >= threshold:
            out.append((i, j, jac))
    return out


def dedup_docs(docs: Sequence[str], mode: str = "both", min_line_chars: int = 8, threshold: float = 0.8,
               ngram: int = 5, num_perm: int = 128, callback: Callback | None = None
               ) -> tuple[list[str], dict[str, Any]]:
    """Deduplicated documents and what was removed. mode exact: drop documents identical to an earlier
    one, then every repeat of a line (stripped, at least min_line_chars long) after its first occurrence
    in the corpus; mode near: drop documents whose estimated Jaccard similarity with an earlier kept one
    is at least `threshold`; both: exact then near. The number of documents never changes (a removed
    document is left empty and dropped by split_corpus), so pass train documents only."""
    if mode not in ("exact", "near", "both"):
        raise PrivacyError(f"--mode {mode!r} is not one of exact, near, both")
    docs = list(docs)
    info: dict[str, Any] = {"mode": mode, "docs_in": len(docs), "chars_in": sum(map(len, docs))}
    with Stage(callback, "dedup", len(docs) * (2 if mode == "both" else 1)) as st:
        if mode in ("exact", "both"):
            seen_docs: set[str] = set()
            seen_lines: dict[str, int] = {}
            removed_docs, removed_lines = 0, 0
            repeats: dict[str, int] = {}
            for i, d in enumerate(docs):
                if d in seen_docs and d:
                    docs[i] = ""
                    removed_docs += 1
                    st.advance()
                    continue
                seen_docs.add(d)
                kept = []
                for line in d.split("\n"):
                    key = line.strip()
                    if len(key) >= min_line_chars and key in seen_lines:
                        removed_lines += 1
                        repeats[key] = repeats.get(key, 1) + 1
                        continue
                    if len(key) >= min_line_chars:
                        seen_lines[key] = i
                    kept.append(line)
                docs[i] = "\n".join(kept)
                st.advance()
            top = sorted(repeats.items(), key=lambda kv: -kv[1])[:10]
            info.update(exact_docs_removed=removed_docs, repeated_lines_removed=removed_lines,
                        most_repeated_lines=[{"line": k, "copies": v} for k, v in top])
        if mode in ("near", "both"):
            live = [i for i, d in enumerate(docs) if d.strip()]
            pairs = near_duplicates([docs[i] for i in live], threshold, ngram, num_perm)
            dropped: set[int] = set()
            for a, b, _ in pairs:
                if live[a] not in dropped:
                    dropped.add(live[b])
            for i in dropped:
                docs[i] = ""
            st.advance(len(docs))
            info.update(near_docs_removed=len(dropped), near_pairs=len(pairs), threshold=threshold, ngram=ngram,
                        num_perm=num_perm)
    info["chars_out"] = sum(map(len, docs))
    info["chars_removed_fraction"] = 1 - info["chars_out"] / max(1, info["chars_in"])
    return docs, info
