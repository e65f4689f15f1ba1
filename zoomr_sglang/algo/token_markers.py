"""What a token's text means to segmentation, decided once per tokenizer instead of per token."""

from typing import Sequence


class TokenMarkers:
    """Per token id, what segmentation decides without string work, computed once per tokenizer
    and shared by every request's segmenter: ``flags[t]``, a sum of

    - :attr:`MARKER`: the text holds a marker or ends in a marker's beginning (otherwise, with no
      earlier token waiting to complete a marker, the token can be no part of one);
    - :attr:`SENTENCE_END`: the text holds a sentence end;
    - :attr:`REFRESH`: the text holds a sentence end, a boundary or the summary end: a request
      refreshes its selection as it decodes the token;
    - :attr:`NONBLANK`: the text holds something other than whitespace.

    An id past ``token_texts`` (models pad their embedding beyond the tokenizer, and sample those
    ids too) reads as empty text: flags 0.
    """

    MARKER, SENTENCE_END, REFRESH, NONBLANK = 1, 2, 4, 8

    def __init__(self, token_texts: Sequence[str], *, boundaries: Sequence[str], summary_begin: str,
                 summary_end: str, sentence_ends: Sequence[str]):
        self.texts = token_texts
        self.settings = (tuple(boundaries), summary_begin, summary_end, tuple(sentence_ends))
        markers = (*boundaries, summary_begin, summary_end)
        beginnings = tuple({m[:k] for m in markers for k in range(1, len(m))})
        refreshing = (*sentence_ends, *boundaries, summary_end)
        self.flags = [
            self.MARKER * (any(m in text for m in markers) or text.endswith(beginnings))
            + self.SENTENCE_END * any(e in text for e in sentence_ends)
            + self.REFRESH * any(m in text for m in refreshing)
            + self.NONBLANK * bool(text.strip())
            for text in token_texts
        ]

    def flags_of(self, token_id: int) -> int:
        return self.flags[token_id] if 0 <= token_id < len(self.flags) else 0

    def text_of(self, token_id: int) -> str:
        return self.texts[token_id] if 0 <= token_id < len(self.texts) else ""
