"""The Gopher tokenizer for transformers (loaded with trust_remote_code=True): gopher_jax's
SentencePiece model run by the sentencepiece library, with gopher_jax's ids.

Why not a stock tokenizer (LlamaTokenizer and its fast `tokenizers` conversion): gopher_jax
encodes a literal U+2581 as its three byte-fallback pieces (SentencePiece itself would read
it as a space), keeps "\\n" as a user-defined piece and decodes each id to its exact bytes;
the conversions re-derive a pre-tokenizer and a decoder from the model file, and none does
all three. Here every id is SentencePiece's, as in gopher_jax/data/tokenizer.py.

With add_special_tokens (the default) a sequence starts with EOS, as documents do in
training; `add_special_tokens=False` gives the bare ids.
"""

from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

# This file runs inside transformers, where gopher_jax need not be installed, so it repeats
# the two rules of gopher_jax/data/tokenizer.py that fix the ids and bytes (the byte table
# and the U+2581 split); tests/test_hf.py checks the two give the same ids and text.
SPACE_SYMBOL = "\u2581"


class GopherTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, eos_token: str = "</s>", unk_token: str = "<unk>",
                 pad_token: str = "<pad>", bos_token: str = "</s>", **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self._bytes = [self._piece_bytes(i) for i in range(self.sp.get_piece_size())]
        self._space_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode()]
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         bos_token=bos_token, **kwargs)

    def _piece_bytes(self, i: int) -> bytes:
        sp = self.sp
        if sp.is_control(i) or sp.is_unknown(i):
            return b""
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):  # "<0xAB>"
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SPACE_SYMBOL, " ").encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def encode_ids(self, text: str) -> list[int]:
        """gopher_jax's ids of `text` (no EOS)."""
        ids: list[int] = []
        for k, part in enumerate(text.split(SPACE_SYMBOL)):
            if k:
                ids += self._space_ids
            ids += self.sp.encode(part)
        return ids

    def tokenize(self, text: str, **kwargs) -> list[str]:
        # Whole text to SentencePiece: no splitting on special-token strings (gopher_jax
        # encodes "</s>" in text as ordinary pieces too).
        return [self.sp.id_to_piece(i) for i in self.encode_ids(text)]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode([self.sp.piece_to_id(t) for t in tokens])

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Each id's exact bytes, as gopher_jax decodes; a control piece (EOS, pad) is its
        token string ("</s>") unless skip_special_tokens, as transformers' tokenizers do
        (lm-evaluation-harness compares text with decode(EOS))."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        parts = []
        for i in map(int, token_ids):
            if self._bytes[i] or not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                parts.append(self._bytes[i])
            elif not skip_special_tokens:
                parts.append(self.sp.id_to_piece(i).encode("utf-8"))
        return b"".join(parts).decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        out = [self.eos_token_id] + list(token_ids_0)
        return out if token_ids_1 is None else out + list(token_ids_1)

    def get_special_tokens_mask(self, token_ids_0: list[int],
                                token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return [int(i in self.all_special_ids) for i in token_ids_0]
        mask = [1] + [0] * len(token_ids_0)
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 1

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None
                        ) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        dest = os.path.join(save_directory, name)
        if os.path.abspath(dest) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, dest)
        return (dest,)
