"""Checkpoints: ``.safetensors`` weights with a JSON model card in the metadata.

A checkpoint holds the network's tensors under ``model.*``, optionally the
optimizer's moments under ``optimizer.*`` (to resume training), and in the
safetensors metadata (string to string) the :class:`ModelCard` as JSON under
:data:`CARD_KEY`. Loading never unpickles anything: PyTorch ``.pt``/``.pth``
files (zip or raw pickle) are recognised by their first bytes and refused with
a message saying how to convert them. The card and the file's header are read
and checked in plain Python (:mod:`napari_fewlabel.models.card`): a damaged
file, a card asking for an absurd network, or tensors that do not fit the
card are refused with the file's name before any weights are read.

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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.atomic import (
    atomic_path,
    check_output_file,
    remove_stale_temp_files,
    write_failed,
)

# The card, its header and the state-file names live in models/card.py (no torch); they
# are re-exported here, where callers have always imported them from.
from napari_fewlabel.models.card import (  # noqa: F401
    CARD_FORMAT_VERSION,
    CARD_KEY,
    ENCODER_ONLY_KEY,
    OPTIMIZER_KEY,
    STATE_SUFFIX,
    ModelCard,
    SafetensorsHeader,
    check_not_pickle,
    is_encoder_only,
    read_card,
    read_safetensors_header,
    state_path,
)
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig

#: A network with more parameters than this is refused before it is built (the default
#: network has about 2 million; 100 million float32 parameters are 400 MB).
MAX_PARAMETERS = 100_000_000

_MODEL_PREFIX = "model."
_OPTIMIZER_PREFIX = "optimizer."


@dataclass(frozen=True, eq=False)
class SegmentationModel:
    """A network with its card: what :func:`load_checkpoint` returns and prediction takes."""

    network: TwoStreamUNet
    card: ModelCard


def build_network(card: ModelCard) -> TwoStreamUNet:
    """An untrained network with the card's architecture (classes from the card).

    The architecture is checked first (:class:`UNetConfig` bounds, classes,
    size), so a damaged or hostile card is refused before memory is allocated.
    """
    return TwoStreamUNet(_checked_config(card))


def _checked_config(card: ModelCard) -> UNetConfig:
    """The card's network config after every check that needs no memory."""
    config = UNetConfig.from_dict(card.architecture)
    if config.num_classes != len(card.classes):
        raise FewLabelError(
            f"The card lists {len(card.classes)} classes but the network has "
            f"{config.num_classes} outputs: the checkpoint is inconsistent; retrain it."
        )
    parameters = sum(p.numel() for p in _network_on_meta(config).parameters())
    if parameters > MAX_PARAMETERS:
        raise FewLabelError(
            f"The card asks for a network of {parameters / 1e6:.0f} million parameters, more "
            f"than the {MAX_PARAMETERS / 1e6:.0f} million napari-fewlabel builds: the card is damaged."
        )
    return config


def _network_on_meta(config: UNetConfig) -> TwoStreamUNet:
    """The network with shapes only (no memory): to check a card and a file against it."""
    with torch.device("meta"):
        return TwoStreamUNet(config)


# ----------------------------------------------------------------------- save
def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Refuse a job's ``--out`` before any work: a .safetensors file in a folder we can write.

    Also removes temporary files of earlier, killed checkpoint writes there.
    """
    out = check_output_file(path, (".safetensors",))
    remove_stale_temp_files(out.parent)
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


def save_file(
    tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` without a temporary file of its own.

    safetensors' own (0.8 at least) writes a ``.tmpXXXXXX`` next to ``filename`` and
    renames it: a process killed meanwhile leaves that file behind, under a name the
    clean-up of our stale temporary files does not (and must not) remove.
    """
    data = serialize(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data)


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Write tensors and string metadata to ``path`` atomically (temp file, fsync, rename).

    Raises
    ------
    FewLabelError
        When the file cannot be written (disk full, no permission), with the free
        space; ``path`` is left as it was and no temporary file stays behind.
    """
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
            raise write_failed(path, e) from e
        except SafetensorError as e:  # how safetensors reports a full disk; not an OSError
            reason = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", str(e))
            raise write_failed(path, reason.group(1) if reason else e) from e
    return path


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
    try:
        config = _checked_config(card)
    except FewLabelError as e:
        raise FewLabelError(
            f"{path}: its model card describes a network that cannot be built "
            f"({str(e).rstrip('.')}); re-save the model or re-train it."
        ) from e
    # Names, shapes and dtypes are compared before any memory is allocated for the weights.
    _check_tensors(path, read_safetensors_header(path), _network_on_meta(config).state_dict())
    network = TwoStreamUNet(config)
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
    metadata = read_safetensors_header(path).metadata
    if OPTIMIZER_KEY not in metadata:
        return None
    try:
        meta = json.loads(metadata[OPTIMIZER_KEY])
    except json.JSONDecodeError as e:
        raise FewLabelError(
            f"{path}: its optimizer state is damaged ({e}); start the run again without --resume."
        ) from e
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


#: torch dtype -> safetensors dtype name, for the types our networks hold.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _check_tensors(
    path: Path, header: SafetensorsHeader, expected: Mapping[str, torch.Tensor]
) -> None:
    """Refuse a file whose ``model.*`` tensors are not the network's (names, shapes, dtypes).

    Floating-point tensors may be stored in any float type (encoders ship as float16).
    """
    stored = {
        k[len(_MODEL_PREFIX) :]: v for k, v in header.tensors.items() if k.startswith(_MODEL_PREFIX)
    }
    problem = ""
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing:
        problem = f"{len(missing)} tensors are missing, e.g. {missing[0]!r}"
    elif extra:
        problem = f"it has {len(extra)} tensors the network lacks, e.g. {extra[0]!r}"
    for name, tensor in expected.items():
        if problem:
            break
        entry = stored[name]
        want = _SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype))
        if entry.shape != tuple(tensor.shape):
            problem = (
                f"{name!r} has shape {list(entry.shape)}, the network needs {list(tensor.shape)}"
            )
        elif entry.dtype != want and not (want in _FLOAT_DTYPES and entry.dtype in _FLOAT_DTYPES):
            problem = f"{name!r} is {entry.dtype}, the network needs {want}"
    if problem:
        raise FewLabelError(
            f"{path}: the weights do not fit the network its model card describes ({problem}); "
            "the file is damaged or was edited: re-save the model or re-train it."
        )


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    read_safetensors_header(path)  # a damaged file is named here, not deep in safetensors
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise FewLabelError(
            f"{path} could not be read ({e}): copy or save it again, or re-train the model."
        ) from e


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
