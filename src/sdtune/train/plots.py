"""``loss.png`` in the run folder: raw and smoothed loss over steps, redrawn at every checkpoint."""

from __future__ import annotations

from sdtune.core.atomic import atomic_path
from sdtune.train.rundir import RunDir


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (what TensorBoard's smoothing slider shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_loss(run: RunDir) -> None:
    rows = [r for r in run.metrics() if "loss" in r]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
    ax.plot(steps, smooth(losses), color="#136", linewidth=1.6, label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run.root.name)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(run.root / "loss.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
