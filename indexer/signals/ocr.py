"""The text-in-photos signal: lines of text read by OCR (`loupe.indexer.signals.ocr_reader`), with
their confidence and box, searchable through the catalog's text index.

Value (JSON): {"lines": [{"text", "conf", "box"}], "size": [w, h]}, where `box` is the line's 4
corners (x, y) as fractions of the picture's width and height (clockwise from the text's top-left),
so the page draws them on any size of the photo. `size` is the decoded size OCR ran on.

Deferred: OCR costs about 2x an embedding on CPU, so it runs as its own resumable pass after
the embeddings (see docs/OCR.md), on its own decode at least 640 pixels on the short side (the
embedding decode is drafted down to the model's input, too small for text).
"""

from __future__ import annotations

import functools
import json
import os

from loupe.indexer.signals.base import JSON, Signal, SourceFile, TextLine
from loupe.indexer.signals.textmatch import normalize

NAME = "text"


@functools.cache
def shared_reader():
    """One reader per process (its ONNX sessions are thread-safe; 1 intra-op thread each call)."""
    from loupe.indexer.signals.ocr_reader import TextReader

    threads = int(os.environ.get("LOUPE_OCR_THREADS", "1"))
    return TextReader(threads=max(1, threads))


class RecognisedText(Signal):
    name = NAME
    version = 1
    storage = JSON
    min_side = 640
    deferred = True

    def unavailable(self) -> str | None:
        from loupe.indexer.signals.ocr_reader import OcrUnavailable, model_paths

        try:
            missing = [p for p in model_paths().values() if not os.path.isfile(p)]
        except OcrUnavailable as exc:
            return str(exc)
        return f"OCR model files missing: {', '.join(missing)}" if missing else None

    def extract(self, image, source: SourceFile) -> dict:
        w, h = image.size
        lines = []
        for text, conf, box in shared_reader().read(image):
            corners = [[round(x / w, 4), round(y / h, 4)] for x, y in box]
            lines.append({"text": text, "conf": round(float(conf), 3), "box": corners})
        return {"lines": lines, "size": [w, h]}

    def text_lines(self, value: dict) -> list[TextLine]:
        return [
            TextLine(line["text"], normalize(line["text"]), float(line["conf"]), json.dumps(line["box"], separators=(",", ":")))
            for line in value.get("lines", [])
            if normalize(line["text"])
        ]

    def distance(self, a: dict, b: dict) -> float:
        """0 when the two photos read the same text, 1 when they share none (Jaccard over lines)."""
        sa = {normalize(x["text"]) for x in a.get("lines", [])}
        sb = {normalize(x["text"]) for x in b.get("lines", [])}
        if not sa and not sb:
            return 0.0
        return 1.0 - len(sa & sb) / len(sa | sb)
