"""One fine-tuning step: losses on a batch and an optimiser update.

* Labelled slices (or the labelled lines of a plane across them): Dice + CE on
  both streams, unlabelled voxels ignored.
* Unlabelled slices: each stream learns from the other's hard pseudo-labels
  (cross pseudo-supervision), with no gradient through them; the term starts
  after a supervised warm-up and is ramped up with a sigmoid, pseudo-labels may
  be restricted to confident pixels and come from a weakly augmented view while
  the loss is on a strongly augmented one.
* AdamW at the schedule's learning rate (:func:`lr_factor`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from napari_fewlabel.data.augment import jitter_intensity, random_geometry, strong_view, warp
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.losses.cross_pseudo_supervision import (
    cross_pseudo_supervision_loss,
    sigmoid_rampup,
)
from napari_fewlabel.losses.dice_ce import dice_ce_loss
from napari_fewlabel.models.unet2d import TwoStreamUNet
from napari_fewlabel.train.device import Precision, autocast
from napari_fewlabel.train.finetune_batches import TrainingBatches

if TYPE_CHECKING:
    from napari_fewlabel.train.finetune import FinetuneSettings


def lr_factor(progress: float, step: int) -> float:
    """Learning-rate multiplier: linear warm-up over 10 steps, constant, cosine to 0.1 over the last 25 %.

    A cosine over the whole run starved the small structures, which a few-slice
    run learns last (mean Dice 0.48 vs 0.86 at 200 steps on the phantom).
    """
    warm = min(1.0, (step + 1) / 10)
    decay = max(0.0, (progress - 0.75) / 0.25)
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, decay))))


class TrainingStep:
    """Trains ``network`` one step at a time on batches drawn by ``batches``.

    Parameters
    ----------
    network : TwoStreamUNet
    optimizer : torch.optim.Optimizer
        Its parameter groups carry ``lr_scale`` (the encoder's may be below 1).
    settings : FinetuneSettings
    batches : TrainingBatches
    use_cps : bool
        Whether the unlabelled term runs (there are unlabelled slices and the
        settings ask for it).
    trained_start : bool
        Training started from trained weights (the encoder may stay frozen).
    generator : torch.Generator
        Augmentation draws.
    device : torch.device
    precision : Precision
    """

    def __init__(
        self,
        network: TwoStreamUNet,
        optimizer: torch.optim.Optimizer,
        settings: FinetuneSettings,
        batches: TrainingBatches,
        *,
        use_cps: bool,
        trained_start: bool,
        generator: torch.Generator,
        device: torch.device,
        precision: Precision,
    ) -> None:
        self.network = network
        self.optimizer = optimizer
        self.settings = settings
        self.batches = batches
        self.use_cps = use_cps
        self.trained_start = trained_start
        self.generator = generator
        self.device = device
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda") if precision.needs_grad_scaler else None

    def cps_weight(self, progress: float) -> float:
        """Weight of the unlabelled term at ``progress`` (0 during the supervised warm-up)."""
        s = self.settings
        if not self.use_cps or progress < s.supervised_warmup:
            return 0.0
        return float(s.cps_weight * sigmoid_rampup(progress - s.supervised_warmup, s.cps_rampup))

    def class_balance(self, progress: float) -> float:
        """Exponent of the cross-entropy's class weights at ``progress``: the setting, down to 0.

        Balanced early, small structures leave the all-background start quickly;
        plain from half-way on, so the weights do not bias the final boundaries
        towards the rare classes, and a slice marked empty keeps its say (with
        the weights to the end, a run still put 131 of 323 heart voxels on a
        heart slice marked empty; with them fading out by half-way, 23 of 260).
        """
        return self.settings.class_balance * max(0.0, 1.0 - 2.0 * progress)

    def __call__(
        self, n_labelled: int, n_unlabelled: int, step: int, progress: float
    ) -> dict[str, float]:
        """One step with ``n_labelled`` + ``n_unlabelled`` slices; the losses as floats."""
        s, network, optimizer = self.settings, self.network, self.optimizer
        device, generator = self.device, self.generator
        for group in optimizer.param_groups:
            group["lr"] = s.learning_rate * lr_factor(progress, step) * group["lr_scale"]
        # A frozen encoder gets no gradient, so AdamW leaves it (and its moments) alone.
        network.encoder.requires_grad_(not (self.trained_start and progress < s.encoder_frozen_for))
        cps_w = self.cps_weight(progress)
        balance = self.class_balance(progress)
        optimizer.zero_grad(set_to_none=True)
        aug = s.augment
        plane = self.batches.choose_plane()
        x_l, y_l = self.batches.labelled(n_labelled, plane)
        x_l, y_l = x_l.to(device), y_l.to(device)
        x_l, y_l_warped = warp(x_l, y_l, random_geometry(n_labelled, aug, generator, device))
        assert y_l_warped is not None
        x_l = jitter_intensity(
            x_l, generator, contrast=aug.contrast, brightness=aug.brightness,
            noise_std=aug.noise_std,
        )  # fmt: skip
        parts: dict[str, float] = {}
        with autocast(device, self.precision):
            if cps_w > 0:
                x_u, _ = warp(
                    self.batches.unlabelled(n_unlabelled, plane).to(device),
                    None,
                    random_geometry(n_unlabelled, aug, generator, device),
                )
                weak = jitter_intensity(
                    x_u, generator, contrast=aug.contrast, brightness=aug.brightness,
                    noise_std=aug.noise_std,
                )  # fmt: skip
                teacher_a = teacher_b = None
                student_input = weak
                if s.strong_view:
                    with torch.no_grad():
                        teacher_a, teacher_b = network(weak)
                    student_input = strong_view(weak, aug, generator)
                logits_a, logits_b = network(torch.cat([x_l, student_input]))
                n = n_labelled
                sup_a, pa = dice_ce_loss(logits_a[:n], y_l_warped, class_balance=balance)
                sup_b, _ = dice_ce_loss(logits_b[:n], y_l_warped, class_balance=balance)
                cps, pc = cross_pseudo_supervision_loss(
                    logits_a[n:],
                    logits_b[n:],
                    teacher_1=teacher_a,
                    teacher_2=teacher_b,
                    threshold=s.confidence_threshold,
                )
                loss = sup_a + sup_b + cps_w * cps
                parts = {"cps": float(cps.detach()), "cps_kept": pc["cps_kept"]}
            else:
                logits_a, logits_b = network(x_l)
                sup_a, pa = dice_ce_loss(logits_a, y_l_warped, class_balance=balance)
                sup_b, _ = dice_ce_loss(logits_b, y_l_warped, class_balance=balance)
                loss = sup_a + sup_b
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if not math.isfinite(float(loss.detach())):
            raise FewLabelError(
                "Training diverged (the loss became NaN/Inf): lower the learning rate, "
                "or check the image for extreme values."
            )
        return {
            "total": float(loss.detach()),
            "supervised": float((sup_a + sup_b).detach()) / 2,
            "train_dice": pa["dice"],
            "cps_weight": cps_w,
            **parts,
        }
