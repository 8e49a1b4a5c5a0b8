"""Reading text in photos: PP-OCRv4 mobile (detection, 0/180 direction, recognition) run through
onnxruntime directly, on the ONNX models inside the `rapidocr-onnxruntime` 1.4.4 wheel (so they
come from PyPI and run offline; only its `DBPostProcess`, the box extraction from the detector's
probability map, is borrowed). Why this model and these settings: docs/OCR.md.

`TextReader.read(image)` (an RGB PIL image, EXIF-rotated):
1. detection on the photo scaled to `det_side` (640) on its long side, up or down, so the cost
   per photo is fixed whatever the camera (PP-OCR's default, short side >= 736, costs ~3x more);
2. each box is cut from the *given* pixels and perspective-corrected; a box taller than 1.5x its
   width (vertical or sideways text) is read both ways: turned 90 degrees, and with its character
   cells re-stacked side by side; the better-scoring reading wins;
3. the direction classifier flips upside-down crops (confidence >= `cls_thresh`);
4. recognition in width-sorted batches, CTC greedy decode; confidence = mean of the per-character
   probabilities. Readings below `min_conf` or without a letter or digit are dropped.

onnxruntime runs with `threads` intra-op threads (default 1: one reader serves several worker
threads, each running its own photo), never "all cores" on a shared machine.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
from PIL import Image

Box = list[tuple[float, float]]
Reading = tuple[str, float, Box]


# ----------------------------------------------------------------------------- models

def model_paths() -> dict[str, str]:
    """The PP-OCRv4 mobile models inside the installed `rapidocr-onnxruntime` wheel (never downloaded)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise OcrUnavailable("reading text in photos needs the rapidocr-onnxruntime package: pip install rapidocr-onnxruntime==1.4.4")
    d = Path(spec.origin).parent / "models"
    return {"det": str(d / "ch_PP-OCRv4_det_infer.onnx"), "rec": str(d / "ch_PP-OCRv4_rec_infer.onnx"),
            "cls": str(d / "ch_ppocr_mobile_v2.0_cls_infer.onnx")}


class OcrUnavailable(RuntimeError):
    """The OCR models or their runtime are not installed."""


class TextReader:
    def __init__(self, det_side: int = 640, gate_side: int | None = None,
                 gate_prob: float = 0.6, det_thresh: float = 0.3, box_thresh: float = 0.5,
                 unclip_ratio: float = 1.6, use_cls: bool = True, cls_thresh: float = 0.9,
                 min_conf: float = 0.5, vertical_ratio: float = 1.5, vertical: bool = True,
                 rec_batch: int = 16, threads: int = 1):
        self.det_side, self.gate_side, self.gate_prob = det_side, gate_side, gate_prob
        self.det_thresh, self.box_thresh, self.unclip_ratio = det_thresh, box_thresh, unclip_ratio
        self.use_cls, self.cls_thresh, self.min_conf = use_cls, cls_thresh, min_conf
        self.vertical_ratio, self.vertical, self.rec_batch, self.threads = vertical_ratio, vertical, rec_batch, threads
        self._lock = threading.Lock()
        self._loaded = False

    # -- lazy loading (models load on the first read, once)
    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            paths = model_paths()
            import onnxruntime as ort
            from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            mk = lambda p: ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
            self._det, self._rec = mk(paths["det"]), mk(paths["rec"])
            self._cls = mk(paths["cls"]) if self.use_cls else None
            chars = self._rec.get_modelmeta().custom_metadata_map["character"].splitlines()
            self._chars = ["<blank>"] + chars + [" "]
            self._post = DBPostProcess(thresh=self.det_thresh, box_thresh=self.box_thresh, max_candidates=1000,
                                       unclip_ratio=self.unclip_ratio, use_dilation=True, score_mode="fast")
            self._loaded = True

    # -- detection
    def _det_prob(self, bgr: np.ndarray, side: int) -> np.ndarray:
        import cv2
        h, w = bgr.shape[:2]
        r = side / max(h, w)
        nh, nw = max(32, int(round(h * r / 32)) * 32), max(32, int(round(w * r / 32)) * 32)
        x = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
        x = (x.astype(np.float32) * (2 / 255.0) - 1.0).transpose(2, 0, 1)[None]
        return self._det.run(None, {self._det.get_inputs()[0].name: x})[0]  # (1, 1, nh, nw)

    def detect(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (n, 4, 2) in original pixel coords, and their scores."""
        h, w = bgr.shape[:2]
        prob = self._det_prob(bgr, self.det_side)
        boxes, scores = self._post(prob, (h, w))
        if len(boxes) == 0:
            return np.zeros((0, 4, 2), np.float32), np.zeros(0)
        order = np.lexsort((boxes[:, 0, 0], (boxes[:, 0, 1] // 10)))  # reading order: rows then x
        return np.asarray(boxes, np.float32)[order], np.asarray(scores)[order]

    # -- cropping
    @staticmethod
    def _crop(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
        import cv2
        pts = pts.astype(np.float32)
        cw = int(max(np.linalg.norm(pts[0] - pts[1]), np.linalg.norm(pts[2] - pts[3])))
        ch = int(max(np.linalg.norm(pts[0] - pts[3]), np.linalg.norm(pts[1] - pts[2])))
        cw, ch = max(cw, 2), max(ch, 2)
        dst = np.float32([[0, 0], [cw, 0], [cw, ch], [0, ch]])
        M = cv2.getPerspectiveTransform(pts, dst)
        return cv2.warpPerspective(img, M, (cw, ch), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)

    @staticmethod
    def _restack(crop: np.ndarray) -> np.ndarray:
        """Vertical stack of upright characters -> the same characters side by side."""
        h, w = crop.shape[:2]
        n = max(1, int(round(h / (w * 0.9))))
        step = h / n
        cells = [crop[int(i * step):int((i + 1) * step)] for i in range(n)]
        ch = min(c.shape[0] for c in cells)
        return np.concatenate([c[:ch] for c in cells], axis=1)

    # -- classifier / recogniser
    def _cls_flip(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        import cv2
        out = list(crops)
        for b in range(0, len(crops), 32):
            batch = []
            for c in crops[b:b + 32]:
                h, w = c.shape[:2]
                rw = min(192, int(math.ceil(48 * w / h)))
                x = cv2.resize(c, (rw, 48)).astype(np.float32) * (2 / 255.0) - 1.0
                pad = np.zeros((48, 192, 3), np.float32)
                pad[:, :rw] = x
                batch.append(pad.transpose(2, 0, 1))
            prob = self._cls.run(None, {self._cls.get_inputs()[0].name: np.stack(batch)})[0]
            for i, p in enumerate(prob):
                if p.argmax() == 1 and p[1] >= self.cls_thresh:
                    out[b + i] = np.ascontiguousarray(crops[b + i][::-1, ::-1])
        return out

    def _recognise(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        import cv2
        res: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        ratios = [c.shape[1] / max(1, c.shape[0]) for c in crops]
        order = np.argsort(ratios)
        for b in range(0, len(crops), self.rec_batch):
            idx = order[b:b + self.rec_batch]
            W = int(math.ceil(48 * max(max(ratios[i] for i in idx), 320 / 48)))
            W = min(W, 48 * 40)
            x = np.zeros((len(idx), 3, 48, W), np.float32)
            for j, i in enumerate(idx):
                rw = min(W, int(math.ceil(48 * ratios[i])))
                im = cv2.resize(crops[i], (max(1, rw), 48)).astype(np.float32) * (2 / 255.0) - 1.0
                x[j, :, :, :rw] = im.transpose(2, 0, 1)
            prob = self._rec.run(None, {self._rec.get_inputs()[0].name: x})[0]  # (n, T, C)
            ids, conf = prob.argmax(-1), prob.max(-1)
            for j, i in enumerate(idx):
                keep = ids[j] != 0
                keep[1:] &= ids[j][1:] != ids[j][:-1]
                text = "".join(self._chars[k] for k in ids[j][keep] if k < len(self._chars))
                res[i] = (text.strip(), float(conf[j][keep].mean()) if keep.any() else 0.0)
        return res

    # -- public
    def read(self, image: Image.Image) -> list[Reading]:
        """[(text, confidence, box)] with box = 4 (x, y) points, clockwise from the text's top-left,
        in the pixel coords of `image` (which must already be EXIF-transposed)."""
        self._load()
        rgb = np.asarray(image.convert("RGB"))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        if self.gate_side:
            if self._det_prob(bgr, self.gate_side).max() < self.gate_prob:
                return []
        boxes, _ = self.detect(bgr)
        if len(boxes) == 0:
            return []
        crops, owner = [], []
        for k, pts in enumerate(boxes):
            c = self._crop(bgr, pts)
            if c.shape[0] >= self.vertical_ratio * c.shape[1]:
                crops.append(np.ascontiguousarray(np.rot90(c)))  # sideways text; cls fixes 180
                owner.append(k)
                if self.vertical:
                    crops.append(self._restack(c))  # stacked characters
                    owner.append(k)
            else:
                crops.append(c)
                owner.append(k)
        if self._cls is not None:
            crops = self._cls_flip(crops)
        recs = self._recognise(crops)
        best: dict[int, tuple[str, float]] = {}
        for k, (t, c) in zip(owner, recs):
            if k not in best or c > best[k][1]:
                best[k] = (t, c)
        out: list[Reading] = []
        for k, (t, c) in sorted(best.items()):
            if c >= self.min_conf and any(ch.isalnum() for ch in t):
                out.append((t, round(c, 4), [(round(float(x), 1), round(float(y), 1)) for x, y in boxes[k]]))
        return out
