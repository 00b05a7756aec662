"""The model card and the safetensors header it lives in; no torch needed.

A checkpoint (:mod:`napari_fewlabel.models.checkpoint`) is a safetensors file:
8 bytes giving the length ``N`` of a JSON header, the header, then the raw
tensor bytes. The header maps each tensor name to its dtype, shape and byte
range, and ``"__metadata__"`` holds strings, among them the :class:`ModelCard`
as JSON under :data:`CARD_KEY`.

Everything here reads only the header, in plain Python: listing models,
resolving a name and checking a command's arguments need no torch import
(seconds at start-up), and a damaged file is recognised, with the name of what
is wrong in it, before a single tensor is read or a network is built.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from napari_fewlabel import __version__
from napari_fewlabel.data.classes import SegmentationClass, check_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Modality

#: safetensors metadata key of the JSON model card.
CARD_KEY = "napari_fewlabel.card"
#: safetensors metadata key of the optimizer's hyper-parameters (JSON), when saved.
OPTIMIZER_KEY = "napari_fewlabel.optimizer"
CARD_FORMAT_VERSION = 1
#: key in a card's ``architecture`` marking a checkpoint that holds only an encoder.
ENCODER_ONLY_KEY = "encoder_only"
#: Suffix of a job's training state (optimizer, critic, queue, ...) written next to its output.
STATE_SUFFIX = ".state.safetensors"
#: Largest slice side a card may ask for: a 4096 x 4096 input is already 16 M pixels per slice.
MAX_INPUT_SIDE = 4096

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# The safetensors library refuses headers above 100 MB; so do we, before reading one.
_MAX_HEADER_BYTES = 100_000_000


def state_path(model_path: str | os.PathLike[str]) -> Path:
    """The training-state file that goes with a job's output file (or the state file itself)."""
    path = Path(model_path)
    if path.name.endswith(STATE_SUFFIX):
        return path
    return path.with_name(path.name.removesuffix(".safetensors") + STATE_SUFFIX)


def _json_normalised(value: Any) -> Any:
    """``value`` as it comes back from JSON (tuples become lists), so cards compare equal."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class ModelCard:
    """What a model is, what it expects and how it was made.

    Attributes
    ----------
    architecture : mapping
        Network config, with ``"name"`` (e.g. :meth:`UNetConfig.to_dict`).
    classes : tuple of SegmentationClass
        Label values with names and colours (0 = background).
    modality : {"CT", "MR", "unknown"}
        Modality of the training images.
    normalization : NormalizationConfig
        Intensity normalisation the network expects.
    input_size : tuple of int
        ``(H, W)`` the network was trained on; slices are fitted to it.
    slice_axis : int
        Axis of the ``(z, y, x)`` display array the network segments slices along.
    training : mapping
        How it was trained: method, settings, data, steps, validation Dice.
    inference : mapping
        Prediction defaults, e.g. ``{"test_time_flips": false}``.
    package_version : str
        napari-fewlabel version that wrote the card.
    format_version : int
        Version of this card layout.
    """

    architecture: Mapping[str, Any]
    classes: tuple[SegmentationClass, ...]
    modality: Modality
    normalization: NormalizationConfig
    input_size: tuple[int, int]
    slice_axis: int = 0
    training: Mapping[str, Any] = field(default_factory=dict)
    inference: Mapping[str, Any] = field(default_factory=dict)
    package_version: str = __version__
    format_version: int = CARD_FORMAT_VERSION

    def __post_init__(self) -> None:
        check_classes(self.classes)
        object.__setattr__(self, "architecture", _json_normalised(dict(self.architecture)))
        object.__setattr__(self, "training", _json_normalised(dict(self.training)))
        object.__setattr__(self, "inference", _json_normalised(dict(self.inference)))
        object.__setattr__(self, "input_size", (int(self.input_size[0]), int(self.input_size[1])))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": self.format_version,
                "package_version": self.package_version,
                "architecture": self.architecture,
                "classes": [c.to_dict() for c in self.classes],
                "modality": self.modality,
                "normalization": self.normalization.to_dict(),
                "input_size": list(self.input_size),
                "slice_axis": self.slice_axis,
                "training": self.training,
                "inference": self.inference,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        """The card in ``text``; a damaged card raises FewLabelError saying which field."""
        return _card_from_json(text, "The model card")


# ----------------------------------------------------------- card validation
class _Damaged(ValueError):
    """A card field that is missing or out of range; the message names it."""


def _whole(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Damaged(f"{what} must be a whole number from {low} to {high}, got {value!r:.40}")
    return value


def _mapping(d: Mapping[str, Any], key: str, *, required: bool = True) -> dict[str, Any]:
    if key not in d and not required:
        return {}
    value = d.get(key)
    if not isinstance(value, dict):
        raise _Damaged(f"{key!r} must be a JSON object, got {value!r:.40}")
    return value


def _class_from_dict(item: Any, position: int) -> SegmentationClass:
    if not isinstance(item, dict) or not {"index", "name", "color"} <= item.keys():
        raise _Damaged(f"class {position} must have an index, a name and a color")
    color = item["color"]
    if not isinstance(color, list) or len(color) != 3:
        raise _Damaged(f"class {position} needs a color of three numbers, got {color!r:.40}")
    r, g, b = (_whole(c, f"the color of class {position}", 0, 255) for c in color)
    index = _whole(item["index"], f"the index of class {position}", 0, 1_000_000)
    if not isinstance(item["name"], str):
        raise _Damaged(f"the name of class {position} must be text")
    return SegmentationClass(index=index, name=item["name"], color=(r, g, b))


def _card_from_dict(d: Any) -> ModelCard:
    """A card from its decoded JSON; raises :class:`_Damaged` or FewLabelError."""
    if not isinstance(d, dict):
        raise _Damaged("it is not a JSON object")
    architecture = _mapping(d, "architecture")
    if not isinstance(architecture.get("name"), str):
        raise _Damaged("'architecture' has no network name")
    classes = d.get("classes")
    if not isinstance(classes, list) or not classes:
        raise _Damaged("'classes' must be a list of classes")
    if d.get("modality") not in get_args(Modality):
        raise _Damaged(
            f"'modality' must be one of {get_args(Modality)}, got {d.get('modality')!r:.40}"
        )
    normalization = _mapping(d, "normalization")
    if not isinstance(normalization.get("method"), str):
        raise _Damaged("'normalization' has no method")
    size = d.get("input_size")
    if not isinstance(size, list) or len(size) != 2:
        raise _Damaged(f"'input_size' must be two numbers (height, width), got {size!r:.40}")
    input_size = (
        _whole(size[0], "the input height", 1, MAX_INPUT_SIDE),
        _whole(size[1], "the input width", 1, MAX_INPUT_SIDE),
    )
    package_version = d.get("package_version", "unknown")
    if not isinstance(package_version, str):
        raise _Damaged("'package_version' must be text")
    try:
        norm = NormalizationConfig.from_dict(normalization)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise _Damaged(f"'normalization' is incomplete ({exc!r:.60})") from exc
    return ModelCard(
        architecture=architecture,
        classes=tuple(_class_from_dict(c, i) for i, c in enumerate(classes)),
        modality=d["modality"],
        normalization=norm,
        input_size=input_size,
        slice_axis=_whole(d.get("slice_axis", 0), "'slice_axis'", 0, 2),
        training=_mapping(d, "training", required=False),
        inference=_mapping(d, "inference", required=False),
        package_version=package_version,
        format_version=_whole(
            d.get("format_version", CARD_FORMAT_VERSION), "'format_version'", 0, CARD_FORMAT_VERSION
        ),
    )


def _card_from_json(text: str, where: str) -> ModelCard:
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FewLabelError(
            f"{where} is not valid JSON ({exc}): re-save the model or re-train it."
        ) from exc
    version = d.get("format_version", 0) if isinstance(d, dict) else 0
    if isinstance(version, int | float) and version > CARD_FORMAT_VERSION:
        raise FewLabelError(
            f"{where} has format {version}, newer than this napari-fewlabel "
            f"({__version__}) reads: update napari-fewlabel."
        )
    try:
        return _card_from_dict(d)
    except (_Damaged, FewLabelError) as exc:
        raise FewLabelError(
            f"{where} is damaged ({str(exc).rstrip('.')}): re-save the model, or re-train it "
            "with `fewlabel finetune`."
        ) from exc


def is_encoder_only(card: ModelCard) -> bool:
    """Whether the checkpoint of ``card`` holds only a (pretrained) encoder."""
    return bool(card.architecture.get(ENCODER_ONLY_KEY, False))


# --------------------------------------------------------- safetensors header
@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    """The checked header of a safetensors file.

    Attributes
    ----------
    metadata : dict of str to str
        The ``"__metadata__"`` strings (the card is under :data:`CARD_KEY`).
    tensors : dict of str to TensorEntry
        Each tensor's dtype and shape; its bytes are known to lie in the file.
    """

    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def check_not_pickle(path: Path) -> None:
    """Refuse pickle-based checkpoints before anything reads them.

    Raises
    ------
    FewLabelError
        For a missing file, a PyTorch zip/pickle checkpoint, or anything that
        is not a safetensors file.
    """
    if not path.is_file():
        raise FewLabelError(f"Model file {path} not found: check the path or the model name.")
    with open(path, "rb") as f:
        head = f.read(9)
    is_zip = head[:4] == b"PK\x03\x04"
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    if is_zip or is_pickle:
        raise FewLabelError(
            f"{path.name} is a PyTorch pickle checkpoint (torch.save). napari-fewlabel never "
            "unpickles files, because unpickling can run any code hidden in them. Convert it "
            "where you trust the file: `sd = torch.load(path, weights_only=True)` then "
            "`safetensors.torch.save_file(sd, 'model.safetensors')` and add a model card, "
            "or retrain with `fewlabel finetune`."
        )
    if len(head) < 9 or head[8:9] != b"{":
        raise FewLabelError(
            f"{path.name} is not a safetensors file: give a .safetensors model written by "
            "napari-fewlabel (e.g. `fewlabel finetune ... --out model.safetensors`)."
        )


def _damaged_file(path: Path, detail: str) -> FewLabelError:
    return FewLabelError(
        f"{path} is damaged or incomplete ({detail}): copy or save it again, or re-train the model."
    )


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and check the header of a safetensors file, without reading any tensor.

    Checked: the header length fits the file, the header is a JSON object,
    every tensor has a known dtype, a shape of whole numbers and a byte range
    of exactly ``prod(shape) * itemsize`` bytes, the ranges follow each other
    without gaps and end where the file ends, and the metadata is strings.

    Raises
    ------
    FewLabelError
        Naming the file and what is wrong with it.
    """
    path = Path(path)
    check_not_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise _damaged_file(
                path, f"its header is said to be {length} bytes long but the whole file has {size}"
            )
        if length > _MAX_HEADER_BYTES:
            raise _damaged_file(path, f"its header is said to be {length} bytes, over 100 MB")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _damaged_file(path, f"its header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _damaged_file(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _damaged_file(path, "its metadata is not a set of texts")
    tensors: dict[str, TensorEntry] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise _damaged_file(
                path, f"tensor {name!r:.60} has no dtype, shape and offsets"
            ) from exc
        if dtype not in DTYPE_SIZES:
            raise _damaged_file(path, f"tensor {name!r:.60} has unknown dtype {dtype!r:.20}")
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise _damaged_file(path, f"tensor {name!r:.60} has shape {shape!r:.40}")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (begin, end)):
            raise _damaged_file(path, f"tensor {name!r:.60} has offsets {begin!r:.20}, {end!r:.20}")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise _damaged_file(
                path, f"tensor {name!r:.60} of shape {shape} {dtype} does not fill its bytes"
            )
        tensors[name] = TensorEntry(dtype, tuple(shape))
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise _damaged_file(path, f"the bytes of tensor {name!r:.60} overlap or leave a gap")
        position = end
    if 8 + length + position != size:
        raise _damaged_file(
            path, f"the tensors need {8 + length + position} bytes but the file has {size}"
        )
    return SafetensorsHeader(metadata=metadata, tensors=tensors)


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """The model card of a checkpoint, from its header only (no tensor is read)."""
    path = Path(path)
    metadata = read_safetensors_header(path).metadata
    if CARD_KEY not in metadata:
        raise FewLabelError(
            f"{path.name} has no napari-fewlabel model card: it was not written by "
            "napari-fewlabel. Train a model with `fewlabel finetune`."
        )
    return _card_from_json(metadata[CARD_KEY], f"The model card of {path}")
