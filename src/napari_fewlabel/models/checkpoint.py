"""Checkpoints: ``.safetensors`` weights with a JSON model card in the metadata.

A checkpoint holds the network's tensors under ``model.*``, optionally the
optimizer's moments under ``optimizer.*`` (to resume training), and in the
safetensors metadata (string to string) the :class:`ModelCard` as JSON under
:data:`CARD_KEY`. Loading never unpickles anything: PyTorch ``.pt``/``.pth``
files (zip or raw pickle) are recognised by their first bytes and refused with
a message saying how to convert them.

A pretrained *encoder* (what ``fewlabel pretrain`` writes and what ships in
``models/weights/``) is a checkpoint with only the ``model.encoder.*``
tensors, possibly stored as float16 (loading casts them back to float32),
and ``"encoder_only": true`` in its card's architecture. Fine-tuning starts
from it (:func:`load_encoder_weights`); :func:`load_checkpoint` refuses it,
since it cannot segment anything before it has been fine-tuned.

Writes are atomic: the file is written next to its destination under a
temporary name, flushed to disk, then renamed over the destination with
``os.replace``, so a crash or a cancelled job never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from napari_fewlabel import __version__
from napari_fewlabel.data.classes import SegmentationClass, check_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.atomic import atomic_path
from napari_fewlabel.io.volume import Modality
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig

#: safetensors metadata key of the JSON model card.
CARD_KEY = "napari_fewlabel.card"
#: safetensors metadata key of the optimizer's hyper-parameters (JSON), when saved.
OPTIMIZER_KEY = "napari_fewlabel.optimizer"
CARD_FORMAT_VERSION = 1
#: key in a card's ``architecture`` marking a checkpoint that holds only an encoder.
ENCODER_ONLY_KEY = "encoder_only"

_MODEL_PREFIX = "model."
_OPTIMIZER_PREFIX = "optimizer."


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
        d = json.loads(text)
        if int(d.get("format_version", 0)) > CARD_FORMAT_VERSION:
            raise FewLabelError(
                f"This model card has format {d['format_version']}, newer than this "
                f"napari-fewlabel ({__version__}) reads: update napari-fewlabel."
            )
        return cls(
            architecture=d["architecture"],
            classes=tuple(SegmentationClass.from_dict(c) for c in d["classes"]),
            modality=d["modality"],
            normalization=NormalizationConfig.from_dict(d["normalization"]),
            input_size=(int(d["input_size"][0]), int(d["input_size"][1])),
            slice_axis=int(d.get("slice_axis", 0)),
            training=d.get("training", {}),
            inference=d.get("inference", {}),
            package_version=str(d.get("package_version", "unknown")),
            format_version=int(d.get("format_version", CARD_FORMAT_VERSION)),
        )


@dataclass(frozen=True, eq=False)
class SegmentationModel:
    """A network with its card: what :func:`load_checkpoint` returns and prediction takes."""

    network: TwoStreamUNet
    card: ModelCard


def build_network(card: ModelCard) -> TwoStreamUNet:
    """An untrained network with the card's architecture (classes from the card)."""
    config = UNetConfig.from_dict(card.architecture)
    if config.num_classes != len(card.classes):
        raise FewLabelError(
            f"The card lists {len(card.classes)} classes but the network has "
            f"{config.num_classes} outputs: the checkpoint is inconsistent; retrain it."
        )
    return TwoStreamUNet(config)


# ----------------------------------------------------------------------- save
#: Suffix of a job's training state (optimizer, critic, queue, ...) written next to its output.
STATE_SUFFIX = ".state.safetensors"


def state_path(model_path: str | os.PathLike[str]) -> Path:
    """The training-state file that goes with a job's output file (or the state file itself)."""
    path = Path(model_path)
    if path.name.endswith(STATE_SUFFIX):
        return path
    return path.with_name(path.name.removesuffix(".safetensors") + STATE_SUFFIX)


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Refuse a job's ``--out`` before any work: it must be a .safetensors file in a folder that exists."""
    out = Path(path)
    if out.suffix != ".safetensors":
        raise FewLabelError(f"--out must end in .safetensors, got {out.name!r}.")
    if not out.parent.is_dir():
        raise FewLabelError(
            f"Folder {out.parent} does not exist: create it or choose another --out."
        )
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    network: torch.nn.Module,
    card: ModelCard,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``network`` (and optionally ``optimizer``) with ``card`` atomically.

    Parameters
    ----------
    path : path-like
        Destination, normally ending in ``.safetensors``.
    network : torch.nn.Module
    card : ModelCard
    optimizer : torch.optim.Optimizer, optional
        Its moments are stored so that training can resume exactly.

    Returns
    -------
    Path
        The destination.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise FewLabelError(
            f"Save models as .safetensors files, not {path.name!r}: e.g. --out model.safetensors"
        )
    tensors = {_MODEL_PREFIX + k: v for k, v in network.state_dict().items()}
    metadata = {CARD_KEY: card.to_json(), "format": "napari-fewlabel"}
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_to_tensors(optimizer.state_dict())
        tensors.update(opt_tensors)
        metadata[OPTIMIZER_KEY] = json.dumps(opt_meta)
    return write_safetensors(path, tensors, metadata)


def save_model_copy(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Copy a model's weights and card to ``path`` (``.safetensors`` added), without its
    optimizer state: what a user keeps or shares (a third of a job checkpoint's size)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    model = load_checkpoint(source)
    return save_checkpoint(path, model.network, model.card)


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Write tensors and string metadata to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata=dict(metadata),
            )
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:
            raise FewLabelError(
                f"Cannot write {path}: {e.strerror or e}. Choose a folder you can write to "
                "with free space."
            ) from e
    return path


def is_encoder_only(card: ModelCard) -> bool:
    """Whether the checkpoint of ``card`` holds only a (pretrained) encoder."""
    return bool(card.architecture.get(ENCODER_ONLY_KEY, False))


def save_encoder_checkpoint(
    path: str | os.PathLike[str],
    encoder: torch.nn.Module,
    card: ModelCard,
    *,
    half: bool = False,
) -> Path:
    """Write a pretrained encoder: its tensors under ``model.encoder.*`` and ``card``.

    Parameters
    ----------
    path : path-like
        Destination ``.safetensors``.
    encoder : torch.nn.Module
        The :class:`~napari_fewlabel.models.unet2d.Encoder`.
    card : ModelCard
        Must be marked encoder-only (:data:`ENCODER_ONLY_KEY`).
    half : bool
        Store floating-point tensors as float16 (half the size; loading into
        a float32 network casts them back).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise FewLabelError(
            f"Save models as .safetensors files, not {path.name!r}: e.g. --out encoder.safetensors"
        )
    if not is_encoder_only(card):
        raise ValueError("an encoder checkpoint needs a card marked encoder_only")
    tensors = {}
    for key, value in encoder.state_dict().items():
        if half and value.is_floating_point():
            value = value.half()
        tensors[f"{_MODEL_PREFIX}encoder.{key}"] = value
    return write_safetensors(path, tensors, {CARD_KEY: card.to_json(), "format": "napari-fewlabel"})


def _optimizer_to_tensors(
    state: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER_PREFIX}{index}.{name}"] = (
                    value.detach().to("cpu").contiguous()
                )
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


# ----------------------------------------------------------------------- load
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
    if len(head) < 9 or head[8:9] != b"{" or struct.unpack("<Q", head[:8])[0] > path.stat().st_size:
        raise FewLabelError(
            f"{path.name} is not a safetensors file: give a .safetensors model written by "
            "napari-fewlabel (e.g. `fewlabel finetune ... --out model.safetensors`)."
        )


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """The model card of a checkpoint, without reading its weights."""
    path = Path(path)
    check_not_pickle(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if CARD_KEY not in metadata:
        raise FewLabelError(
            f"{path.name} has no napari-fewlabel model card: it was not written by "
            "napari-fewlabel. Train a model with `fewlabel finetune`."
        )
    return ModelCard.from_json(metadata[CARD_KEY])


def load_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> SegmentationModel:
    """Load a checkpoint's network and card (no optimizer state, never unpickling).

    Parameters
    ----------
    path : path-like
        A ``.safetensors`` file written by :func:`save_checkpoint`.
    device : str or torch.device
        Where to put the network.
    """
    path = Path(path)
    card = read_card(path)
    if is_encoder_only(card):
        raise FewLabelError(
            f"{path.name} is a pretrained encoder, not a segmentation model: fine-tune it on "
            f"your labelled slices first (`fewlabel finetune IMAGE LABELS --model {path.stem} "
            "--out model.safetensors`) and use the model that writes."
        )
    network = build_network(card)
    state = _read_prefixed(path, _MODEL_PREFIX)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FewLabelError(
            f"{path.name}: the weights do not match the architecture in its model card "
            f"({str(e).splitlines()[0]}). The file is damaged or was edited; retrain or re-export it."
        ) from e
    network.to(device).eval()
    return SegmentationModel(network=network, card=card)


def load_optimizer_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The optimizer ``state_dict`` stored with a checkpoint, or None when there is none."""
    path = Path(path)
    check_not_pickle(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if OPTIMIZER_KEY not in metadata:
        return None
    meta = json.loads(metadata[OPTIMIZER_KEY])
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in _read_prefixed(path, _OPTIMIZER_PREFIX).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, scalars in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(scalars)
    return {"state": state, "param_groups": meta["param_groups"]}


def read_model_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``model.*`` tensors of a checkpoint (prefix removed), as stored, without a network.

    For checkpoints whose "network" is not a :class:`TwoStreamUNet`, such as a
    pretraining job's training state.
    """
    path = Path(path)
    check_not_pickle(path)
    return _read_prefixed(path, _MODEL_PREFIX)


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118


class HasEncoder(Protocol):
    """A network with an ``encoder`` module (fine-tuning's or pretraining's)."""

    @property
    def encoder(self) -> torch.nn.Module: ...


def load_encoder_weights(network: HasEncoder, path: str | os.PathLike[str]) -> Sequence[str]:
    """Copy the encoder tensors of a checkpoint into ``network``; return the names copied.

    Used to start fine-tuning from a pretrained encoder or from another model
    whose classes differ, and to continue pretraining from an encoder. Shapes
    must match (same widths and ``in_slices``).
    """
    path = Path(path)
    check_not_pickle(path)
    state = _read_prefixed(path, _MODEL_PREFIX)
    encoder_state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder_state:
        raise FewLabelError(f"{path.name} has no encoder weights to start from.")
    try:
        network.encoder.load_state_dict(encoder_state, strict=True)
    except RuntimeError as e:
        raise FewLabelError(
            f"The encoder in {path.name} does not fit this network ({str(e).splitlines()[0]}): "
            "start from a model with the same architecture, or train from scratch."
        ) from e
    return sorted(encoder_state)
