"""A request's generated text, grown token by token at the cost of the new token's bytes.

The tokenizer decodes ids to bytes (a piece's own bytes: a leading-space piece keeps its
space, a byte-fallback piece is one byte) and the bytes to text with UTF-8, errors replaced
(data/tokenizer.py). A character spread over several byte pieces is unfinished until its
last byte: decoding all the tokens so far shows that unfinished tail as U+FFFD. `TextSoFar`
keeps the finished text and the standard library's incremental UTF-8 decoder (which holds
back only bytes that may still start a valid character), so `text` equals
`tokenizer.decode(tokens)` after every token, character for character, without decoding the
earlier tokens again.
"""

from __future__ import annotations

import codecs


class TextSoFar:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finished = ""  # the text of every byte but an unfinished character at the end
        self.text = ""  # what decoding all the bytes at once gives

    def add(self, data: bytes) -> str:
        """Appends one token's bytes -> the new `text`."""
        self.finished += self._decoder.decode(data)
        tail = self._decoder.getstate()[0]
        self.text = self.finished + tail.decode("utf-8", errors="replace") if tail \
            else self.finished
        return self.text

    def find_stop(self, stops: tuple[str, ...], finished_before: int) -> int:
        """Where the first of `stops` starts in `text`, or -1; `finished_before` is the length
        of `finished` before the last `add`. An earlier text held none of them, so a match
        ends after that point: only the end of the text is searched."""
        at = -1
        for s in stops:
            i = self.text.find(s, max(0, finished_before - len(s) + 1))
            if i >= 0 and (at < 0 or i < at):
                at = i
        return at


def token_name(data: bytes, piece: str) -> str:
    """How logprobs name a token with bytes `data` (SentencePiece piece `piece`): its text
    when the bytes are UTF-8 on their own; a control piece (no bytes: EOS, pad, unknown) by
    its piece ("</s>"); otherwise "bytes:" and the bytes as \\xNN escapes, the form OpenAI's
    completions use for a piece of a character. Tokens with different bytes get different
    names, so top_logprobs never merges two byte pieces into one U+FFFD key."""
    if not data:
        return piece
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
