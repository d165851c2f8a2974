"""Pictures of what `analysis.py` finds: attention heatmaps, hidden states on principal
components, a curve (loss, rewards). Written as PNG with matplotlib's Agg backend (no display
needed); matplotlib is imported on the first picture (the `demo` extra installs it).

    plot_attention(maps, tokens, path), plot_pca(vectors, labels, path), plot_pca_panels(panels, path),
    plot_curve(values, path)
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .analysis import _visible, pca
from .files import atomic_write

__all__ = ["plot_attention", "plot_curve", "plot_history", "plot_pca", "plot_pca_panels"]


MATPLOTLIB_MISSING = (
    "the pictures need matplotlib, which pyminigpt's `demo` extra installs: pip install 'pyminigpt[demo]'"
)


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _require_matplotlib() -> None:
    if not have_matplotlib():
        raise ImportError(MATPLOTLIB_MISSING)


def _pyplot():
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _grid(plt, panels: int, columns: int, panel_inches: float, extra_width: float = 1.0):
    """A figure with `panels` axes laid out `columns` wide (the unused ones hidden), as a flat list."""
    rows = math.ceil(panels / columns)
    size = (panel_inches * columns + extra_width, panel_inches * rows + 0.8)
    fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False, layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def plot_attention(
    maps: torch.Tensor,
    tokens: Sequence[str],
    path,
    title: str | None = None,
    columns: int | None = None,
    panel_titles: Sequence[str] | None = None,
) -> str:
    """Write a PNG grid of attention heatmaps with the tokens on both axes (keys across,
    queries down). `maps` is (layers, heads, T, T); the panels go in order (layer 0's
    heads first), `columns` to a row (default: one row per layer). `panel_titles`
    replaces the default 'layer l head h' titles (one per panel)."""
    if maps.ndim != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps must be (layers, heads, T, T), got shape {tuple(maps.shape)}")
    if len(tokens) != maps.shape[-1]:
        raise ValueError(f"tokens has {len(tokens)} entries but the maps are over T={maps.shape[-1]} tokens")
    layers, heads, T = maps.shape[0], maps.shape[1], maps.shape[-1]
    columns = heads if columns is None else int(columns)
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if panel_titles is None:
        panel_titles = [f"layer {layer} head {head}" for layer in range(layers) for head in range(heads)]
    if len(panel_titles) != layers * heads:
        raise ValueError(f"panel_titles has {len(panel_titles)} entries for {layers * heads} panels")
    columns = min(columns, layers * heads)
    panel = min(max(1.6, 0.22 * T), 6.0, 13.0 / columns)  # at most ~13 inches across, as a page shows it
    plt = _pyplot()
    fig, axes = _grid(plt, layers * heads, columns, panel)
    labels = [_visible(t) for t in tokens]
    show_labels = T <= 48
    fontsize = min(6.0, 0.85 * 72 * panel / T)  # one row of a panel in points
    flat_maps = maps.reshape(layers * heads, T, T).float().cpu()
    for i, ax in enumerate(axes):
        image = ax.imshow(flat_maps[i].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks([])
        ax.set_yticks([])
        if show_labels and i + columns >= len(axes):  # key tokens under the bottom panel of each column
            ax.set_xticks(range(T), labels, fontsize=fontsize, rotation=90)
        if show_labels and i % columns == 0:  # query tokens left of the first column
            ax.set_yticks(range(T), labels, fontsize=fontsize)
        ax.set_title(panel_titles[i], fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention")
    fig.suptitle(title or "attention (query rows, key columns)", fontsize=10)
    return _save(fig, path)


def _pca_scatter(ax, vectors: torch.Tensor, labels: Sequence[str], title: str, connect: bool = False) -> None:
    """Draw `vectors` (N, C) on their first two principal components into `ax`, each point
    annotated with its label (at most 64 labels, so that a large set stays readable) and
    coloured by its index; `connect` joins the points in order (a sentence's tokens)."""
    if len(labels) != vectors.shape[0]:
        raise ValueError(f"labels has {len(labels)} entries for {vectors.shape[0]} vectors")
    coords, ratio = pca(vectors, k=2)
    x, y = coords[:, 0].numpy(), coords[:, 1].numpy()
    if connect:
        ax.plot(x, y, color="0.75", linewidth=0.8, zorder=1)
    ax.scatter(x, y, s=18, alpha=0.8, c=range(len(x)), cmap="viridis", zorder=2)
    if len(labels) <= 64:
        for (px, py), label in zip(coords.tolist(), labels):
            ax.annotate(_visible(str(label)), (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    else:
        title += f" ({len(labels)} points, unlabelled)"
    ax.set_xlabel(f"PC 1 ({ratio[0]:.0%} of variance)", fontsize=8)
    ax.set_ylabel(f"PC 2 ({ratio[1]:.0%} of variance)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def plot_pca(vectors: torch.Tensor, labels: Sequence[str], path, title: str | None = None) -> str:
    """Write a PNG scatter of `vectors` (N, C) on their first two principal components,
    each point annotated with its label."""
    return plot_pca_panels([(vectors, labels, title or "PCA")], path, columns=1, panel_inches=6.0)


def plot_pca_panels(
    panels: Sequence[tuple[torch.Tensor, Sequence[str], str]],
    path,
    title: str | None = None,
    columns: int = 3,
    panel_inches: float = 4.2,
    connect: bool | Sequence[bool] = False,
) -> str:
    """Write a PNG grid of PCA scatters, one per (vectors (N, C), labels, panel title) in
    `panels`, each on its own two principal components; `connect` (one for all panels, or
    one per panel) joins a panel's points in order."""
    if len(panels) == 0:
        raise ValueError("panels must not be empty")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    connect = [connect] * len(panels) if isinstance(connect, bool) else list(connect)
    if len(connect) != len(panels):
        raise ValueError(f"connect has {len(connect)} entries for {len(panels)} panels")
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels), min(columns, len(panels)), panel_inches, extra_width=0.0)
    for ax, (vectors, labels, panel_title), join in zip(axes, panels, connect):
        _pca_scatter(ax, vectors, labels, panel_title, join)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_curve(values: Sequence[float], path, title: str = "", xlabel: str = "step", ylabel: str = "value") -> str:
    """Write a PNG line plot of `values` (e.g. the rewards of a feedback session)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(range(1, len(values) + 1), list(values), marker="o", markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_history(history: list[dict], path: str | os.PathLike) -> Path:
    """Write the training (and eval) loss curve of `history` as a PNG (matplotlib, Agg backend)."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], lw=1, label="train loss")
    evals = [r for r in history if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=3, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write(path, fig.savefig)
