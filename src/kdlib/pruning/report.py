"""What a prune leaves beside the checkpoint: ``scores.json`` and ``importance.png``.

The scores are what a later run or a reader needs to see why these layers and units were kept
(and to re-plan at another size without recomputing them); the plot shows them at a glance: block
influence and drop-one KL per layer with the kept layers marked, the angular distance of every
span, head scores per layer, and the sorted MLP and hidden channel scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdlib.pruning.config import PrunePlan
from kdlib.pruning.importance import Scores

SCORES_FILE = "scores.json"
PLOT_FILE = "importance.png"


def save_scores(scores: Scores, directory: str | Path, **extra) -> Path:
    """Write ``scores`` (and ``extra`` top-level entries) to ``directory/scores.json``."""
    path = Path(directory) / SCORES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, "scores": scores.as_dict()}, indent=1) + "\n", encoding="utf-8")
    return path


def load_scores(directory: str | Path) -> Scores:
    return Scores.from_dict(json.loads((Path(directory) / SCORES_FILE).read_text(encoding="utf-8"))["scores"])


def plot_scores(scores: Scores, plan: PrunePlan, directory: str | Path) -> Path:
    """A 2x2 figure of the scores with the plan's kept layers marked, saved as importance.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_layers = len(scores.block_influence)
    layers = np.arange(n_layers)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))

    ax = axes[0, 0]
    ax.bar(layers, scores.block_influence, color=["tab:blue" if i in plan.layers else "lightgray" for i in layers])
    ax.set(xlabel="layer (kept in colour)", ylabel="block influence 1 - cos", title="Layer scores")
    if scores.layer_kl is not None:
        twin = ax.twinx()
        twin.plot(layers, scores.layer_kl, "o-", color="tab:red", markersize=3)
        twin.set_ylabel("KL when dropped alone", color="tab:red")
        twin.set_yscale("log")

    ax = axes[0, 1]
    grid = np.full((n_layers, n_layers + 1), np.nan)
    for span, values in scores.angular.items():
        grid[span - 1, : len(values)] = values
    image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                      extent=(-0.5, n_layers + 0.5, 0.5, n_layers + 0.5))  # rows: span lengths 1..L
    ax.set(xlabel="first layer of the span", ylabel="layers in the span", title="Angular distance d(l, n)")
    fig.colorbar(image, ax=ax)

    ax = axes[1, 0]
    image = ax.imshow(np.array(scores.heads).T, aspect="auto", origin="lower", cmap="magma")
    ax.set(xlabel="layer", ylabel="query head", title="Head contribution (rms)")
    fig.colorbar(image, ax=ax)

    ax = axes[1, 1]
    channels = np.sort(np.array(scores.channels), axis=1)[:, ::-1]
    for q, style in ((0.1, ":"), (0.5, "-"), (0.9, "--")):
        ax.plot(np.quantile(channels, q, axis=0), style, color="tab:green", label=f"MLP channels, layer quantile {q}")
    hidden = np.sort(scores.hidden(plan.layers).numpy())[::-1]
    ax.plot(hidden / hidden.max() * channels.max(), color="tab:purple", label="hidden channels (scaled)")
    ax.set(xlabel="rank", ylabel="score", yscale="log", title="Channel scores, sorted")
    ax.legend(fontsize=7)

    fig.tight_layout()
    path = Path(directory) / PLOT_FILE
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
