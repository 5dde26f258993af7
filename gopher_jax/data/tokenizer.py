"""SentencePiece BPE with byte fallback, set up so that decode(encode(x)) == x for any text."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from gopher_jax import storage
from gopher_jax.errors import DataError

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
# SentencePiece shows spaces as U+2581 inside pieces and turns U+2581 back into a space on
# decode, so a literal U+2581 in the text is encoded as its three byte-fallback pieces.
SPACE_SYMBOL = "\u2581"
MAX_LINE_BYTES = 16_384
# Enough text for a 32k vocabulary; SentencePiece needs ~10x the text in memory.
TRAIN_MAX_CHARS = 200_000_000


class Tokenizer:
    """A SentencePiece model plus the exact bytes each id stands for."""

    def __init__(self, model_proto: bytes, path: str = ""):
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size: int = self.sp.get_piece_size()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self._bytes = [self._piece_to_bytes(i) for i in range(self.vocab_size)]
        self.piece_bytes = np.array([len(b) for b in self._bytes], dtype=np.int32)
        self._space_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode()]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = storage.data_path(path)
        if not path.is_file():
            raise DataError(f"no tokenizer at {path}", "train one with `python -m gopher_jax "
                            "tokenizer train --config ...` (or `data prepare`)")
        return cls(path.read_bytes(), str(path))

    def _piece_to_bytes(self, i: int) -> bytes:
        sp = self.sp
        if sp.is_control(i) or sp.is_unknown(i):
            return b""
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):  # "<0xAB>"
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SPACE_SYMBOL, " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        if SPACE_SYMBOL not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(text.split(SPACE_SYMBOL)):
            if k:
                ids += self._space_ids
            ids += self.sp.encode(part)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like [encode(t) for t in texts], using SentencePiece's threads."""
        plain = [i for i, t in enumerate(texts) if SPACE_SYMBOL not in t]
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, self.sp.encode([texts[i] for i in plain]),
                          strict=True):
            out[i] = ids
        for i, t in enumerate(texts):
            if SPACE_SYMBOL in t:
                out[i] = self.encode(t)
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._bytes
        return b"".join(table[int(i)] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """SentencePiece trains on lines; '\n' itself is a user-defined piece."""
    total = 0
    for text in texts:
        for line in text.split("\n"):
            if line and len(line.encode()) <= MAX_LINE_BYTES:
                yield line
        total += len(text)
        if total >= max_chars:
            return


def _vocab_error(vocab_size: int, message: str) -> DataError:
    """SentencePiece's refusal as the config change that fixes it."""
    need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if need:  # many distinct characters (e.g. a CJK corpus): each needs a piece
        return DataError(f"model.vocab_size={vocab_size} is too small for this corpus: its "
                         f"characters alone need {need.group(1)} pieces",
                         f"set --config.model.vocab_size >= {need.group(1)}")
    most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)",
                     message)
    if most:  # a small corpus has fewer distinct pieces than asked for
        return DataError(f"model.vocab_size={vocab_size} is too large for this corpus: it "
                         f"yields at most {most.group(1)} pieces",
                         f"set --config.model.vocab_size <= {most.group(1)}")
    return DataError(f"SentencePiece could not train a {vocab_size}-piece vocabulary: "
                     f"{message.splitlines()[0]}", "change model.vocab_size or the corpus")


def train_tokenizer(texts: Iterable[str], path: str | os.PathLike, vocab_size: int,
                    nfkc: bool = False, max_chars: int = TRAIN_MAX_CHARS) -> Tokenizer:
    """Train a BPE model on `texts` (the first `max_chars` of them) and write it to `path`.

    Deterministic: the same texts give the same model file.
    """
    if vocab_size < 300:
        raise DataError(f"model.vocab_size={vocab_size} is too small: byte fallback alone takes "
                        "256 pieces plus 5 special ones", "set --config.model.vocab_size >= 300")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts, max_chars), model_writer=buf,
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
            character_coverage=0.9995,  # rarer characters fall back to bytes
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            user_defined_symbols=["\n"],
            normalization_rule_name="nfkc" if nfkc else "identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=MAX_LINE_BYTES, input_sentence_size=0,
            num_threads=2, minloglevel=2)
    except RuntimeError as e:
        raise _vocab_error(vocab_size, str(e)) from None
    path = storage.data_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(path, buf.getvalue())  # a reader never sees half a model
    return Tokenizer(buf.getvalue(), str(path))


def held_out_stats(tok: Tokenizer, texts: Iterable[str]) -> dict[str, float | int | bool]:
    """Tokens per byte and whether the round trip is exact, on held-out text."""
    n_tok = n_bytes = 0
    exact = True
    for t in texts:
        ids = tok.encode(t)
        n_tok += len(ids)
        n_bytes += len(t.encode())
        exact &= tok.decode(ids) == t
    return {"tokens": n_tok, "bytes": n_bytes,
            "tokens_per_byte": n_tok / max(n_bytes, 1), "roundtrip_exact": exact}
