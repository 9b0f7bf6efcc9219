"""The one training loop every task uses: epochs, optimiser steps, validation, best epoch, seeds, threads.

Why: detection, segmentation, the nodule branch, the small-nodule candidate
classifier and the nodule-presence classifier each had their own epoch loop,
and each chose, kept and restored its best checkpoint a little differently.
Here there is one: a task gives :func:`fit` what one training epoch is (its
batches, loss and :class:`Optimisation` steps) and how to validate, and the loop
does the rest the same way for all of them.

Why not MONAI's ``SupervisedTrainer``: most tasks do not iterate a
``DataLoader`` (detection draws patches around mined false positives, the
classifiers draw class-balanced batches from their own generators), and the
shipped bundles were trained with these exact draws; a plain loop keeps them
step for step, so a retrain with the same seed gives the same weights.

What :func:`fit` does, per epoch: run ``train_epoch`` (timed: ``train_seconds``);
every ``val_interval`` epochs and after the last, run ``validate`` (timed:
``validation_seconds``) and keep a CPU copy of the weights when its score is the
best so far (ties go to the earlier or the later epoch, as the task says); call
``after_epoch`` (e.g. hard-negative mining); log one line; at the end load the
best weights back into the network.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["FitResult", "Optimisation", "Validation", "fit", "seed_everything", "set_threads"]

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's generators and make cuDNN deterministic (MONAI's ``set_determinism``)."""
    from monai.utils import set_determinism

    set_determinism(seed=seed)


def set_threads(threads: int | None) -> None:
    """PyTorch's intra-op CPU threads (None: leave PyTorch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


class Optimisation:
    """One optimiser step of a loss: zero the gradients, backward (AMP loss scaling when enabled), optional
    gradient-norm clipping, optimiser step, learning-rate scheduler step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        scale_loss: bool = False,
        clip_norm: float | None = None,
    ) -> None:
        self.optimizer, self.scheduler, self.clip_norm = optimizer, scheduler, clip_norm
        self.scaler = torch.amp.GradScaler("cuda", enabled=scale_loss)

    def step(self, loss: torch.Tensor) -> None:
        """Apply the gradient of ``loss`` (a scalar)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._parameters(), self.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def learning_rate(self) -> float:
        """The learning rate of the next step (the first parameter group's)."""
        if self.scheduler is not None:
            return float(self.scheduler.get_last_lr()[0])
        return float(self.optimizer.param_groups[0]["lr"])

    def _parameters(self) -> Iterable[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass
class Validation:
    """What ``validate`` returns: ``score`` (higher is better; any comparable value, e.g. a tuple), the fields
    it adds to the epoch's record entry, a short text for the log, and whatever the task wants back for
    the best epoch (``keep``: e.g. its detections)."""

    score: Any
    fields: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    keep: Any = None


@dataclass
class FitResult:
    """The epochs' record entries and the best validated epoch (0, ``keep`` None: nothing was validated)."""

    epochs: list[dict[str, Any]]
    best_epoch: int = 0
    best: Validation | None = None
    seconds: float = 0.0


def fit(
    network: torch.nn.Module,
    *,
    epochs: int,
    train_epoch: Callable[[int], dict[str, Any]],
    validate: Callable[[int], Validation] | None = None,
    val_interval: int = 1,
    ties: Literal["earlier", "later"] = "earlier",
    after_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    name: str = "training",
    progress: bool = False,
) -> FitResult:
    """Train ``network`` for ``epochs`` epochs; returns the record and leaves the best weights loaded.

    ``train_epoch(epoch)`` runs one epoch and returns its record entry (at least
    ``loss``); ``validate(epoch)`` scores the network after epochs ``val_interval``,
    2 x ``val_interval``, ... and the last. The first validation is the best so far
    whatever its score; a later one replaces it when its score is higher (or equal,
    with ``ties="later"``). ``after_epoch(epoch, entry)`` runs after the validation
    and may add fields to the entry. Without ``validate`` the weights of the last
    epoch stay.
    """
    from tqdm.auto import tqdm

    if epochs < 1 or val_interval < 1:
        raise ValueError(f"epochs and val_interval must be >= 1, got {epochs} and {val_interval}")
    result = FitResult(epochs=[])
    best_state: dict[str, torch.Tensor] | None = None
    started = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc=name, unit="epoch", disable=not progress)
    for epoch in bar:
        epoch_start = time.perf_counter()
        entry = {"epoch": epoch, **train_epoch(epoch)}
        entry["train_seconds"] = time.perf_counter() - epoch_start
        validation = None
        if validate is not None and (epoch % val_interval == 0 or epoch == epochs):
            val_start = time.perf_counter()
            validation = validate(epoch)
            entry.update(validation.fields)
            entry["validation_seconds"] = time.perf_counter() - val_start
            if result.best is None or validation.score > result.best.score or (
                ties == "later" and validation.score == result.best.score
            ):
                result.best, result.best_epoch = validation, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}
        if after_epoch is not None:
            after_epoch(epoch, entry)
        entry["seconds"] = time.perf_counter() - epoch_start
        result.epochs.append(entry)
        logger.info("%s epoch %d/%d: loss %.4f, %.1f s%s", name, epoch, epochs, entry["loss"], entry["seconds"],
                    f", validation {validation.summary}" if validation is not None and validation.summary else "")
        bar.set_postfix(loss=f"{entry['loss']:.3f}",
                        best=f"{_number(result.best.score) if result.best is not None else math.nan:.3f}")
    result.seconds = time.perf_counter() - started
    if best_state is not None:
        network.load_state_dict(best_state)
    return result


def _number(score: Any) -> float:
    """The first number of a score (a tuple's first element), for the progress bar."""
    value = score[0] if isinstance(score, tuple) else score
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
