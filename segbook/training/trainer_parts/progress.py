"""What the training log shows as a run trains: one line per epoch (loss, EMA pseudo-Dice, every group's rate,
ETA), and nnU-Net's progress plot drawn less often (nnU-Net redraws a large progress.png every epoch: seconds
wasted on short epochs)."""

from __future__ import annotations

from typing import Any, Callable

PLOT_EVERY_EPOCHS = 10


def epoch_line(epoch: int, epochs: int, rates: dict[str, float], recent: list[dict[str, Any]]) -> str:
    """The line after epoch `epoch` of `epochs`; `recent`: the last epochs' records (the ETA is their mean time)."""
    remaining = (epochs - epoch - 1) * sum(e["seconds"] for e in recent) / len(recent)
    lr_text = " ".join(f"{name}={rate:.2e}" for name, rate in rates.items())
    return (f"[segbook] epoch {epoch + 1}/{epochs} | train loss {recent[-1]['train_loss']:.3f} | EMA pseudo-Dice "
            f"{recent[-1]['ema_pseudo_dice']:.3f} | lr {lr_text} | ETA {_duration(remaining)}")


def throttle_plot(logger: Any, epoch_and_budget: Callable[[], tuple[int, int]]) -> None:
    """Have nnU-Net's logger draw its plot every `PLOT_EVERY_EPOCHS` epochs and after the last one only."""
    draw = logger.plot_progress_png

    def occasionally(output_folder: str) -> None:
        epoch, epochs = epoch_and_budget()
        if epoch % PLOT_EVERY_EPOCHS == 0 or epoch >= epochs - 1:
            draw(output_folder)

    logger.plot_progress_png = occasionally


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
