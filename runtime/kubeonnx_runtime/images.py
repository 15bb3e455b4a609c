"""Image endpoints' processing: decode an image, preprocess it into the model's input tensor as
`spec.processing` declares, and turn the model's class scores into labels.

Pure functions and a pipeline object, no web framework; decoding is CPU work that the HTTP
layer runs on threads (Pillow releases the GIL while it decodes and resizes). An image is
opened and checked from its header first (`ImagePipeline.open`: format, pixels, JPEG scans,
the memory its decode will hold), and decoded only after that (`ImagePipeline.decode`), within
a process-wide memory budget (`DecodeBudget`).
"""

from __future__ import annotations

import asyncio
import collections
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from python_multipart.multipart import MultipartParser, parse_options_header

from .datatypes import TensorSpec
from .errors import FatalStartupError, InvalidRequest, describe

FORMATS = ("JPEG", "PNG", "WEBP")
# RFC 2046 allows 70; python-multipart takes up to 256 and raises beyond.
MAX_BOUNDARY = 256
JPEG_HEAD_FF = 65536
_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}
# Our own pixel limit is checked first and names the problem; Pillow's bomb warning would
# only repeat it in a worse form.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
# Bytes per pixel an image's decode holds at its peak, on top of the decoded frame (4 bytes a
# pixel: Pillow keeps RGB in 32 bits) and of one more frame for each conversion. Measured with
# Pillow 13: libwebp's lossless decoder and Pillow's copy of its output take 12 more (14
# here, for a margin).
_DECODER_EXTRA = {"JPEG": 0, "PNG": 0, "WEBP": 14}
_FRAME = 4
# EXIF orientation: the transpositions that show the stored pixels as the camera was held
# (ImageOps.exif_transpose's table).
_ORIENT = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}
# 16-bit greyscale (PNG): Pillow's conversion to 8 bits would clip at 255.
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class _Config(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ImageInput(_Config):
    size: tuple[int, int]
    resize: Literal["bilinear", "nearest", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR"] = "RGB"
    scale: float = Field(1 / 255, gt=0)
    input: str | None = None
    max_pixels: int = Field(40_000_000, ge=1)


class Classification(_Config):
    top_k: int = Field(5, ge=1)
    softmax: bool = False
    output: str | None = None


class Detection(_Config):
    boxes: str = "boxes"
    scores: str = "scores"
    box_format: Literal["xyxy", "cxcywh"] = "xyxy"
    normalized: bool = False
    score_threshold: float = Field(0.25, ge=0)
    iou_threshold: float = Field(0.45, gt=0, le=1)
    max_detections: int = Field(100, ge=1)


class ProcessingInput(_Config):
    image: ImageInput


class ProcessingOutput(_Config):
    classification: Classification | None = None
    detection: Detection | None = None


class Processing(_Config):
    """KUBEONNX_PROCESSING: the InferenceModel's spec.processing, as JSON."""

    input: ProcessingInput
    output: ProcessingOutput = ProcessingOutput()


def load_processing(raw: str) -> Processing:
    try:
        return Processing.model_validate_json(raw)
    except ValidationError as exc:
        raise FatalStartupError(
            f"invalid processing (KUBEONNX_PROCESSING): {describe(exc)}"
        ) from None


def load_labels(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FatalStartupError(f"cannot read the labels file {path}: {exc}") from None
    labels = [line.strip() for line in lines]
    while labels and not labels[-1]:
        labels.pop()
    return labels


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "index": self.index, "score": self.score}


@dataclass(frozen=True)
class Found:
    """One detected object; the box in the uploaded image's pixels."""

    label: str
    index: int
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2

    def as_dict(self) -> dict[str, Any]:
        x1, y1, x2, y2 = self.box
        return {
            "label": self.label,
            "index": self.index,
            "score": self.score,
            "box": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
        }


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over union of one x1,y1,x2,y2 box with each of `others`."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def non_max_suppression(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, threshold: float, limit: int
) -> list[int]:
    """Greedy NMS per class: the indices kept, best score first. A box is dropped when it
    overlaps a better box of the same class by more than `threshold` IoU."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        kept.append(int(i))
        if len(kept) == limit:
            break
        rest = order[position + 1 :]
        rest = rest[(classes[rest] == classes[i]) & ~suppressed[rest]]
        if rest.size:
            suppressed[rest[iou(boxes[i], boxes[rest]) > threshold]] = True
    return kept


class ImagePipeline:
    """Checked against the model once, at start-up: the input takes one image of the
    declared size, layout and channels, and the outputs are one row of class scores
    (classification) or boxes and their class scores (detection)."""

    def __init__(
        self,
        processing: Processing,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        labels: list[str] | None = None,
        *,
        max_scans: int = 32,
    ) -> None:
        image = processing.input.image
        self.image = image
        self.max_scans = max_scans
        self.detection = processing.output.detection
        self.classification = processing.output.classification or Classification()
        self.labels = labels
        self.input = _pick(inputs, image.input, "input", "spec.processing.input.image.input")
        spec = self.input
        height, width = image.size
        if spec.datatype != "FP32":
            raise FatalStartupError(
                f"image processing feeds FP32; model input '{spec.name}' takes {spec.datatype}"
            )
        wanted = (1, 3, height, width) if image.layout == "NCHW" else (1, height, width, 3)
        if len(spec.shape) != 4 or not spec.fits(wanted):
            raise FatalStartupError(
                f"model input '{spec.name}' has shape {list(spec.shape)}, which does not take an "
                f"image of {image.layout} {list(wanted[1:])} (spec.processing.input.image size "
                "and layout)"
            )
        if self.detection is not None:
            if processing.output.classification is not None:
                raise FatalStartupError(
                    "spec.processing.output takes classification or detection, not both"
                )
            where = "spec.processing.output.detection"
            self.boxes = _pick(outputs, self.detection.boxes, "output", f"{where}.boxes")
            self.scores = _pick(outputs, self.detection.scores, "output", f"{where}.scores")
            if len(self.boxes.shape) != 3 or self.boxes.shape[2] not in (4, -1):
                raise FatalStartupError(
                    f"model output '{self.boxes.name}' has shape {list(self.boxes.shape)}; "
                    "detection boxes are [batch, boxes, 4]"
                )
            if len(self.scores.shape) != 3:
                raise FatalStartupError(
                    f"model output '{self.scores.name}' has shape {list(self.scores.shape)}; "
                    "detection scores are [batch, boxes, classes]"
                )
            self.output = self.scores  # the class scores, whose count the labels must match
        else:
            name = self.classification.output
            self.output = _pick(
                outputs, name, "output", "spec.processing.output.classification.output"
            )
            if len(self.output.shape) != 2:
                raise FatalStartupError(
                    f"model output '{self.output.name}' has shape {list(self.output.shape)}; "
                    "classification takes [batch, classes]"
                )
        classes = self.output.shape[-1] if self.output.shape else -1
        if labels is not None and classes != -1 and len(labels) != classes:
            raise FatalStartupError(
                f"the labels file has {len(labels)} labels and model output "
                f"'{self.output.name}' has {classes} classes"
            )
        self._resample = _FILTERS[image.resize]
        std = np.array(image.std, dtype=np.float32)
        # (x * scale - mean) / std, as one multiply and one subtract per value.
        self._gain = (np.float32(image.scale) / std).astype(np.float32)
        self._offset = (np.array(image.mean, dtype=np.float32) / std).astype(np.float32)

    def preprocess(self, data: bytes, where: str) -> tuple[np.ndarray, tuple[int, int]]:
        """One image's bytes to a [1, ...] tensor and the image's (width, height), or
        InvalidRequest naming the problem."""
        return self.decode(self.open(data, where))

    def open(self, data: bytes, where: str) -> OpenedImage:
        """Read and check an image's header, decoding nothing: its format, its pixels, its
        JPEG scans, and the memory its decode will hold. InvalidRequest names the problem."""
        if not data:
            raise InvalidRequest(f"{where} is empty")
        if data.startswith(b"\xff\xd8"):
            # Pillow reads a JPEG's header a marker at a time in Python, about a microsecond
            # each: 16 million 4-byte comments would take it 18 s. Every marker starts with
            # 0xFF, counted in C; real headers (EXIF, thumbnails, ICC) hold a few thousand.
            head_end = data.find(b"\xff\xda")
            if data.count(b"\xff", 0, head_end if head_end >= 0 else len(data)) > JPEG_HEAD_FF:
                raise InvalidRequest(
                    f"{where} is a JPEG with more than {JPEG_HEAD_FF} marker bytes (0xFF) "
                    "before its first scan"
                )
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise InvalidRequest(f"{where} is not a JPEG, PNG or WebP image") from None
        except Image.DecompressionBombError:  # Pillow's own, far larger, limit
            raise InvalidRequest(
                f"{where} is over the limit of {self.image.max_pixels} pixels"
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidRequest(f"{where} has a corrupt image header: {exc}") from None
        width, height = img.size
        limit = self.image.max_pixels
        if width * height > limit:
            raise InvalidRequest(
                f"{where} is {width}x{height} pixels, over the limit of {limit} pixels"
            )
        if img.format == "JPEG":
            # Each scan is a pass over every block of the image: a few hundred make a small
            # file take tens of seconds. Counting the SOS markers anywhere in the file may
            # count one of a thumbnail's too, never fewer than there are.
            scans = data.count(b"\xff\xda")
            if scans > self.max_scans:
                raise InvalidRequest(
                    f"{where} is a JPEG of {scans} scans, over the limit of {self.max_scans}"
                )
        orientation = _orientation(img)
        frames = (
            1
            + (img.mode != "RGB")
            + (img.mode in _SIXTEEN_BIT)
            + (orientation != 1 or img.format == "PNG")
        )
        cost = width * height * (_FRAME * frames + _DECODER_EXTRA.get(img.format or "", 14))
        return OpenedImage(img, where, orientation, cost)

    def decode(self, opened: OpenedImage) -> tuple[np.ndarray, tuple[int, int]]:
        """An opened image to a [1, ...] tensor and its (width, height) as the user sees it:
        EXIF orientation applied, 16-bit greyscale scaled to 8 bits, then the declared
        preprocessing."""
        img, where = opened.image, opened.where
        # The opened image is let go of here: a WebP's decoder keeps its whole canvas.
        opened.image = None
        assert img is not None, "an image is decoded once"
        source = img
        h, w = self.image.size
        try:
            img.load()
            # A PNG's eXIf chunk may follow its pixels (its cost counted the transposition).
            orientation = opened.orientation if img.format != "PNG" else _orientation(img)
            if img.mode in _SIXTEEN_BIT:
                grey = np.asarray(img, dtype=np.float32) * np.float32(255 / 65535) + 0.5
                img = Image.fromarray(grey.astype(np.uint8), "L")
                del grey
            if img.mode != "RGB":
                img = img.convert("RGB")
            for step in _ORIENT.get(orientation, ()):
                img = img.transpose(step)
            size = img.size
            resized = img.resize((w, h), self._resample)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidRequest(f"{where} is a corrupt or truncated image: {exc}") from None
        finally:
            source.close()
        pixels = np.asarray(resized, dtype=np.float32)  # H, W, RGB
        if self.image.channels == "BGR":
            pixels = pixels[..., ::-1]
        pixels = pixels * self._gain - self._offset
        if self.image.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels)[None], size

    def answer(self, outputs: dict[str, np.ndarray], size: tuple[int, int]) -> dict[str, Any]:
        """The answer for one image from its model outputs (first dimension 1)."""
        if self.detection is not None:
            found = self.detect(outputs[self.boxes.name][0], outputs[self.scores.name][0], size)
            return {"detections": [f.as_dict() for f in found]}
        return {"predictions": [p.as_dict() for p in self.classify(outputs[self.output.name][0])]}

    def detect(self, boxes: np.ndarray, scores: np.ndarray, size: tuple[int, int]) -> list[Found]:
        """Boxes and class scores of one image to its detections, best first: each box's
        best class, those under the score threshold dropped, non-maximum suppression per
        class, boxes scaled back to the uploaded image and clipped to it."""
        spec = self.detection
        assert spec is not None
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(len(boxes), -1)
        height, width = self.image.size
        if spec.normalized:
            boxes = boxes * [width, height, width, height]
        if spec.box_format == "cxcywh":
            cx, cy, w, h = boxes.T
            boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        classes = scores.argmax(axis=1)
        best = scores[np.arange(len(scores)), classes]
        keep = best >= spec.score_threshold
        boxes, best, classes = boxes[keep], best[keep], classes[keep]
        kept = non_max_suppression(boxes, best, classes, spec.iou_threshold, spec.max_detections)
        # The image was resized to the model's input without keeping its aspect ratio.
        scale = np.array([size[0] / width, size[1] / height] * 2)
        limit = np.array([size[0], size[1]] * 2, dtype=np.float64)
        labels = self.labels
        found = []
        for i in kept:
            box = np.clip(boxes[i] * scale, 0, limit)
            index = int(classes[i])
            label = labels[index] if labels is not None and index < len(labels) else str(index)
            x1, y1, x2, y2 = (float(v) for v in box)
            found.append(Found(label, index, float(best[i]), (x1, y1, x2, y2)))
        return found

    def classify(self, scores: np.ndarray) -> list[Prediction]:
        """One row of class scores to the top K predictions, best first."""
        row = np.asarray(scores, dtype=np.float64).reshape(-1)
        if self.classification.softmax:
            shifted = np.exp(row - row.max())
            row = shifted / shifted.sum()
        k = min(self.classification.top_k, row.size)
        top = np.argsort(-row, kind="stable")[:k]
        labels = self.labels
        return [
            Prediction(
                labels[i] if labels is not None and i < len(labels) else str(i),
                int(i),
                float(row[i]),
            )
            for i in top
        ]


@dataclass
class OpenedImage:
    """An image whose header was read and checked; nothing is decoded yet."""

    image: Image.Image | None  # None once decoded
    where: str  # what to call it in an error
    orientation: int  # EXIF orientation, 1 as stored
    cost: int  # bytes its decode holds at its peak, estimated from the header


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation the image's header carries (1 without one); never decodes."""
    raw = img.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
        value = exif.get(ExifTags.Base.Orientation, 1)
    except Exception:  # a broken EXIF block: Pillow's parser raises many kinds
        return 1
    return value if isinstance(value, int) and value in _ORIENT else 1


class DecodeBudget:
    """The memory the image decodes of a process may hold at once: a decode takes its share
    before it starts, waiting in turn (first come, first served) while others hold it, and
    gives it back once done. An image that needs more than all of it is refused."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def check(self, opened: OpenedImage) -> None:
        if opened.cost > self.limit:
            raise InvalidRequest(
                f"{opened.where} needs about {opened.cost >> 20} MiB to decode, over the limit "
                f"of {self.limit >> 20} MiB"
            )

    async def acquire(self, cost: int) -> None:
        if not self._waiting and self.held + cost <= self.limit:
            self.held += cost
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((cost, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted as it was cancelled
                self.release(cost)
            else:
                self._waiting.remove((cost, waiter))
                self._wake()
            raise

    def release(self, cost: int) -> None:
        self.held -= cost
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self.held + self._waiting[0][0] <= self.limit:
            cost, waiter = self._waiting.popleft()
            self.held += cost
            waiter.set_result(None)


def _pick(specs: list[TensorSpec], name: str | None, what: str, field: str) -> TensorSpec:
    if name is not None:
        for spec in specs:
            if spec.name == name:
                return spec
        raise FatalStartupError(
            f"{field} {name!r} is not a model {what}; the model's are "
            + ", ".join(s.name for s in specs)
        )
    if what == "input" and len(specs) != 1:
        raise FatalStartupError(
            f"the model has {len(specs)} inputs; {field} must name the one that takes the image"
        )
    return specs[0]


@dataclass
class Part:
    name: str
    filename: str | None
    data: bytes


def parse_multipart(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    """The parts of a multipart/form-data body already read whole (and bounded) in memory,
    or InvalidRequest naming what is wrong with it."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("multipart/form-data without a boundary")
    if len(boundary) > MAX_BOUNDARY:
        raise InvalidRequest(
            f"the multipart boundary is {len(boundary)} characters; at most {MAX_BOUNDARY}"
        )
    parts: list[Part] = []
    headers: dict[bytes, bytes] = {}
    field: list[bytes] = []
    value: list[bytes] = []
    chunks: list[bytes] = []

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise InvalidRequest(f"the request has more than {max_parts} parts")
        headers.clear()
        chunks.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.append(data[start:end])

    def on_header_end() -> None:
        headers[b"".join(field).lower()] = b"".join(value)
        field.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode(errors="replace")
        filename = disposition.get(b"filename")
        parts.append(
            Part(name, filename.decode(errors="replace") if filename else None, b"".join(chunks))
        )

    callbacks: dict[str, Callable[..., None]] = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(f"malformed multipart/form-data body: {exc}") from None
    return parts
