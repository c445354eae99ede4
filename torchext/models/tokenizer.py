"""A SentencePiece-style tokenizer built from a GGUF file's own vocabulary (tokenizer.ggml.*).

GGUF files of the "llama" tokenizer model (Gemma, Llama 2, Mistral ...) store every piece with a
score and a type. Encoding is SentencePiece's BPE rule, as llama.cpp applies it: spaces become
"▁", the text starts as single characters, and the adjacent pair whose concatenation is a piece
with the highest score is merged, leftmost first on ties, until no pair is a piece; a character
that is no piece falls back to its UTF-8 bytes ("<0xE2>" ...). Control and user-defined pieces
("<start_of_turn>", Gemma's "<unused0>" ... "<unused6241>", "\\n\\n") are matched whole in the raw
text first, the longest at a position, as Hugging Face's tokenizer treats them. tests/test_gemma3.py
checks the ids against `transformers`' tokenizer.
"""

from __future__ import annotations

import heapq
import operator
import re
from typing import Sequence

SPACE = "\u2581"  # "▁", SentencePiece's visible space

# token_type values of tokenizer.ggml.token_type (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def checked_token_ids(ids: Sequence[int], vocab_size: int, arg: str) -> list[int]:
    """ids as a list of ints, ValueError (naming `arg`, the id and its position) for one that is
    not an integer in [0, vocab_size): int() would truncate 1.5, and a negative id would index
    the vocabulary from its end."""
    checked = []
    for position, tid in enumerate(ids):
        try:
            value = None if isinstance(tid, bool) else operator.index(tid)
        except TypeError:
            value = None
        if value is None:
            raise ValueError(f"{arg}: expected integer token ids, got {tid!r} at position {position}")
        if not 0 <= value < vocab_size:
            raise ValueError(f"{arg}: token id {value} at position {position} is outside the vocabulary "
                             f"[0, {vocab_size})")
        checked.append(value)
    return checked


def _trie_pattern(words) -> str:
    """A regular expression matching any of `words`, the longest at a position, shaped as their prefix
    tree, so that a character is compared with one branch per level: the plain alternation of
    Gemma's 6,414 pieces compares each of them at every character (0.34 s to split the 57k-character
    README against 0.6 ms; compiling this one takes 0.2 s)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here

    def pattern(node: dict) -> str:
        branches = []
        for ch, child in node.items():
            if not ch:
                continue
            literal = re.escape(ch)
            while len(child) == 1 and "" not in child:  # a chain of single children: one literal
                (ch, child), = child.items()
                literal += re.escape(ch)
            branches.append(literal + pattern(child))
        if not branches:
            return ""
        body = "(?:" + "|".join(branches) + ")"
        # greedy: the longer word first, this node's own word when no longer one matches
        return body + "?" if "" in node else body

    return pattern(trie)


class GGUFTokenizer:
    """encode(text) -> ids and decode(ids) -> text over a GGUF vocabulary."""

    def __init__(self, pieces: Sequence[str], scores: Sequence[float], types: Sequence[int],
                 bos_id: int, eos_id: int, add_bos: bool = True, add_space_prefix: bool = False) -> None:
        self.pieces = list(pieces)
        self.scores = list(scores)
        self.types = list(types)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_space_prefix = add_bos, add_space_prefix
        self.ids = {p: i for i, p in enumerate(self.pieces) if self.types[i] in (NORMAL, USER_DEFINED, UNUSED)}
        self.byte_ids = {int(self.pieces[i][3:5], 16): i for i, t in enumerate(self.types) if t == BYTE}
        # pieces matched whole in the raw text, Gemma's 6,242 "<unusedN>" control pieces included (transformers
        # matches them whole too); the longest at a position wins, so "\n\n" over "\n"
        self._whole = {p: i for i, p in enumerate(self.pieces) if self.types[i] in (CONTROL, USER_DEFINED) and p}
        self._split = re.compile("(" + _trie_pattern(self._whole) + ")") if self._whole else None

    @classmethod
    def from_gguf(cls, reader) -> "GGUFTokenizer":
        """From a gguf.GGUFReader (or a path to a GGUF file)."""
        if not hasattr(reader, "fields"):
            import gguf
            reader = gguf.GGUFReader(reader)
        f = reader.fields

        def get(key, default=None):
            return f[key].contents() if key in f else default

        model = get("tokenizer.ggml.model")
        if model != "llama":
            raise ValueError("tokenizer.ggml.model: only the SentencePiece 'llama' tokenizer is supported, "
                             f"got {model!r}")
        return cls(get("tokenizer.ggml.tokens"), get("tokenizer.ggml.scores"), get("tokenizer.ggml.token_type"),
                   bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
                   add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", False)))

    def __len__(self) -> int:
        return len(self.pieces)

    # ---- encode ----------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of text: control and user-defined pieces whole, the rest merged pair by pair
        by piece score (the module docstring's rule); <bos> first when add_bos (default: as the
        file says)."""
        ids = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
        parts = self._split.split(text) if self._split else [text]
        for j, part in enumerate(parts):
            if j % 2:  # a whole control / user-defined piece
                ids.append(self._whole[part])
            elif part:
                prefix = SPACE if self.add_space_prefix and j == 0 else ""
                ids.extend(self._encode_plain(prefix + part.replace(" ", SPACE)))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        # a doubly linked list of symbols; a heap of candidate merges (-score, left position)
        sym = list(text)
        nxt = list(range(1, len(sym))) + [-1]
        prv = list(range(-1, len(sym) - 1))
        heap: list[tuple[float, int, str, str]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j >= 0:
                merged = sym[i] + sym[j]
                tid = self.ids.get(merged)
                if tid is not None:
                    heapq.heappush(heap, (-self.scores[tid], i, sym[i], sym[j]))

        for i in range(len(sym) - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if j < 0 or sym[i] != left or sym[j] != right:
                continue  # stale: one side was merged since this pair was pushed
            sym[i], sym[j] = left + right, ""
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        ids: list[int] = []
        i = 0
        while i >= 0:
            tid = self.ids.get(sym[i])
            if tid is not None:
                ids.append(tid)
            else:  # a character that is no piece: its UTF-8 bytes
                ids.extend(self.byte_ids[b] for b in sym[i].encode("utf-8"))
            i = nxt[i]
        return ids

    # ---- decode ----------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_control: bool = True) -> str:
        """The text of token ids (ints, numpy integers or integer tensor elements); ValueError
        naming the first id that is not in the vocabulary."""
        out = bytearray()
        for tid in checked_token_ids(ids, len(self.pieces), "ids"):
            t = self.types[tid]
            if t == BYTE:
                out.append(int(self.pieces[tid][3:5], 16))
            elif t == CONTROL and skip_control:
                continue
            else:
                out += self.pieces[tid].replace(SPACE, " ").encode("utf-8")
        return out.decode("utf-8", errors="replace")
