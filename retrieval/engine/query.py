"""Query language: a sentence, an image path, or a weighted sum of both.

    loupe search a dog on a beach                   one sentence (text -> image)
    loupe search ./dog.jpg                          an image (image -> image)
    loupe search '"2:beach" + ./dog.jpg - "people"'  a weighted sum
    loupe search 2:beach + ./dog.jpg - people       (same, as separate shell words)

The grammar, chosen so that no query is read in a way its user did not mean:

- Text. Words are text. A quoted "..." is always text, whatever it contains (a path, a
  `+`, a `-`); quotes only protect, so `"t - shirt" on a line` is the one sentence
  `t - shirt on a line`.
- Images. A term is an image only when it clearly is a path: it starts with `/`, `./`,
  `../` or `~/`, or it ends in an image extension (`.jpg`, `.png`, ... as
  `loupe.indexer.pipeline.imageio.image_extensions`), or it is forced with `img:PATH` (`img:"my photo"` for a
  name with spaces or none). A word that merely names a file in the current folder (`beach`)
  stays text. An image term must name an existing file, or the query is an error; it stands
  alone between operators.
- Weights. `W:` at the start of a term weights it (`2:beach`, `0.5:./dog.jpg`, `-1:people`,
  `2:"a beach"`, or inside the quotes `"2:a beach"`), only when a number is followed by a colon
  and then by something that is not a number: `10:30 sunset`, `4:3 photo`, `2: beach` are text.
  After `W:"`, the quoted text is literal (`1:"2:beach"` searches for the text "2:beach").
- Text in photos. `text:"WORDS"` (or `text:WORDS`) as the whole query searches only the text read
  in photos (OCR), as Term(1, "ocr", WORDS). A plain sentence also finds it: photos whose text holds
  the sentence come first (`loupe.retrieval.engine.search`).
- Operators. `+` and `-` standing alone (spaces around them, outside quotes) add and subtract
  terms, but only in an expression: a query with at least one quoted, weighted or image
  term. Otherwise the whole query is one sentence and they are part of it: `a dog - not a cat`,
  `t - shirt` and `salt + pepper` are text; `a dog - "a cat"` subtracts. An operator with no
  term on one side is an error. `mother-in-law` has no standalone operator: always text.

A shell word is split into terms only where it has quotes or a standalone operator, so a path
with spaces passed as one shell word ("./my photos/dog.jpg") stays one path.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Sequence

from loupe.indexer.errors import LoupeError

_WEIGHT = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+)):")
_NOT_A_WEIGHT_AFTER = re.compile(r"\s|[+-]?\.?\d")  # `10:30`, `2: x`, `2:.5`: a number or a gap follows
_STANDALONE_OP = re.compile(r"(?:^|\s)[+-](?:\s|$)")
_PATH_START = re.compile(r"\.{1,2}/|~[^/\s]*/|/+[^/\s]")
IMAGE_PREFIX = "img:"
WEB_IMAGE_REF = re.compile(r"(upload:[0-9a-f]{1,64}|photo:[0-9]{1,18}|moment:[0-9]{1,18})")  # web queries: images by id (moment:ID a video moment), never by path


@dataclass(frozen=True)
class Term:
    weight: float
    kind: str  # 'text' | 'image'
    value: str


@dataclass(frozen=True)
class _Token:
    text: str  # quotes removed
    head: str  # the characters before the first quote (all of `text` when unquoted)
    quoted: bool

    @property
    def is_operator(self) -> bool:
        return not self.quoted and self.text in ("+", "-")


def _split(word: str) -> list[_Token]:
    """One shell word into tokens: split on whitespace outside double quotes, but only when the
    word has quotes or a standalone operator (a path with spaces stays whole)."""
    if '"' not in word and not _STANDALONE_OP.search(word):
        word = word.strip()
        return [_Token(word, word, False)] if word else []
    out: list[_Token] = []
    buf: list[str] = []
    head: str | None = None
    in_quote = False
    for ch in word + " ":
        if ch == '"':
            if head is None:
                head = "".join(buf)
            in_quote = not in_quote
            continue
        if ch.isspace() and not in_quote:
            if buf or head is not None:
                text = "".join(buf)
                out.append(_Token(text, text if head is None else head, head is not None))
            buf, head = [], None
            continue
        buf.append(ch)
    if in_quote:
        raise LoupeError("unbalanced double quote in query")
    return out


def _strip_weight(tok: _Token) -> tuple[float, _Token]:
    """The weight at the start of a term, and the token without it."""
    if tok.quoted and tok.head == "":  # "2:beach": the weight just inside the quotes
        m = _WEIGHT.match(tok.text)
        rest = tok.text[m.end():] if m else ""
        if m and rest and not _NOT_A_WEIGHT_AFTER.match(rest):
            return float(m.group(1)), _Token(rest, "", True)
        return 1.0, tok
    m = _WEIGHT.match(tok.head)
    if m:
        rest_head = tok.head[m.end():]
        if (rest_head == "" and tok.quoted) or (rest_head and not _NOT_A_WEIGHT_AFTER.match(rest_head)):
            return float(m.group(1)), _Token(tok.text[m.end():], rest_head, tok.quoted)
    return 1.0, tok


@functools.lru_cache(maxsize=1)
def _image_extensions() -> frozenset[str]:
    from loupe.indexer.pipeline.imageio import image_extensions  # imports Pillow: only for words with an extension

    return image_extensions()


def looks_like_path(text: str) -> bool:
    """Whether an unquoted term clearly names a file: a path prefix or an image extension."""
    if _PATH_START.match(text):
        return True
    ext = os.path.splitext(text)[1]
    return len(ext) > 1 and not any(c.isspace() for c in ext) and ext.lower() in _image_extensions()


def _image_path(tok: _Token, web: bool = False) -> str | None:
    """The path of an image token (forced with img: or path-like), else None; `web`: also upload:ID, photo:ID."""
    if web and not tok.quoted and WEB_IMAGE_REF.fullmatch(tok.text):
        return tok.text
    if tok.head.startswith(IMAGE_PREFIX):
        return tok.text[len(IMAGE_PREFIX):]
    if not tok.quoted and looks_like_path(tok.text):
        return tok.text
    return None


def _resolve_image(raw: str, forced: bool) -> str:
    if not raw.strip():
        raise LoupeError(f"empty image path after '{IMAGE_PREFIX}'")
    path = os.path.abspath(os.path.expanduser(raw))
    if not os.path.exists(path):
        hint = "" if forced else f" (to search for it as text, quote it: '\"{raw}\"')"
        raise LoupeError(f"no such image file: {raw}{hint}")
    if not os.path.isfile(path):
        raise LoupeError(f"not a file: {raw}")
    return path


TEXT_ONLY = re.compile(r'\s*text:\s*(?:"(?P<quoted>[^"]*)"|(?P<bare>.*?))\s*', re.DOTALL)


def parse_query(words: Sequence[str], web: bool = False) -> list[Term]:
    """Parse the query words from the command line into weighted text/image terms (grammar above).

    `web`: a query typed into the web page, which must never name a file on the server: a path-like
    or img: term is an error, and `upload:ID` (an uploaded image) and `photo:ID` (an indexed photo,
    by catalog row id) are the image terms, kept as Term(weight, "image", "upload:ID"|"photo:ID").
    """
    joined = " ".join(words)
    only = TEXT_ONLY.fullmatch(joined)
    if only is not None:  # text:"..." searches the text read in photos alone
        value = (only.group("quoted") if only.group("quoted") is not None else only.group("bare")).strip()
        if not value:
            raise LoupeError('empty text query: text:"WORDS"')
        return [Term(1.0, "ocr", value)]
    tokens = [tok for w in words for tok in _split(w)]
    if not tokens:
        raise LoupeError("empty query")
    segments: list[list[_Token]] = [[]]
    signs = [1.0]
    for tok in tokens:
        if tok.is_operator:
            if not segments[-1]:
                where = "starts with" if len(segments) == 1 else "has two in a row:"
                raise LoupeError(f"query {where} an operator '{tok.text}' (quote it to search for it as text)")
            segments.append([])
            signs.append(-1.0 if tok.text == "-" else 1.0)
        else:
            segments[-1].append(tok)
    if not segments[-1]:
        raise LoupeError("query ends with an operator (quote it to search for it as text)")
    heads = [_strip_weight(seg[0]) for seg in segments]
    expression = any(
        tok.quoted or _image_path(tok, web) is not None for seg in segments for tok in seg
    ) or any(w != 1.0 or stripped is not seg[0] for (w, stripped), seg in zip(heads, segments))
    if not expression:  # one sentence: standalone + and - are words of it
        return [Term(1.0, "text", " ".join(tok.text for tok in tokens))]
    terms: list[Term] = []
    for seg, sign, (weight, first) in zip(segments, signs, heads):
        seg = [first, *seg[1:]]
        images = [(tok, p) for tok in seg if (p := _image_path(tok, web)) is not None]
        if images:
            if len(seg) > 1:
                words_ = " ".join(t.text for t in seg)
                raise LoupeError(f"an image term must stand alone between + and -: '{words_}' (quote the text)")
            tok, raw = images[0]
            if web:
                if not WEB_IMAGE_REF.fullmatch(raw) or tok.quoted:
                    raise LoupeError(f"the web query cannot name files: '{tok.text}' (use upload:ID or photo:ID, or quote it as text)")
                terms.append(Term(sign * weight, "image", raw))
                continue
            terms.append(Term(sign * weight, "image", _resolve_image(raw, tok.head.startswith(IMAGE_PREFIX))))
            continue
        text = " ".join(tok.text for tok in seg).strip()
        if not text:
            raise LoupeError("empty term in query")
        terms.append(Term(sign * weight, "text", text))
    if all(t.weight <= 0 for t in terms):
        raise LoupeError("query has no positive term")
    return terms
