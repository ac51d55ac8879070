"""What every kvmem view shares: the offline HTML type and the figure/axes convention.

Each analysis draws its own figures next to its results (`kvmem/tracing/plots.py`,
`kvmem/memories/views.py`, ...); they all follow one convention, implemented here:

- `result.plot(ax=None, *, title=None)` returns the matplotlib Figure. `ax=None` makes a new
  figure; otherwise it draws on the given Axes, or on a sequence of Axes for a result drawn in
  several panels (`figure_axes` checks the count).
- `result.show(...)` returns an `HTMLView` (offline-safe HTML).

The offline report (`kvmem.viz.report`) assembles these views into one page.
"""

from __future__ import annotations

from kvmem.errors import InvalidArgumentError
from kvmem.viz.html import HTMLView


def figure_axes(ax=None, n: int = 1, **subplots_kwargs):
    """(figure, list of `n` axes) for a `plot(ax=None)` that draws `n` panels.

    `ax=None`: a new figure with one row of `n` panels (`subplots_kwargs` go to `plt.subplots`,
    e.g. `figsize`). Otherwise `ax` is one Axes (when `n == 1`) or a sequence (or array) of `n`
    Axes; the figure is the first one's.
    """
    if ax is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, n, squeeze=False, **subplots_kwargs)
        return fig, list(axes[0])
    from matplotlib.axes import Axes

    if isinstance(ax, Axes):
        axes = [ax]
    else:
        try:
            axes = list(ax.flat) if hasattr(ax, "flat") else list(ax)
        except TypeError:
            raise InvalidArgumentError(
                f"ax must be None, a matplotlib Axes or a sequence of them, got {type(ax).__name__}."
            ) from None
    if len(axes) != n or not all(isinstance(a, Axes) for a in axes):
        what = "one Axes" if n == 1 else f"a sequence of {n} Axes"
        raise InvalidArgumentError(f"This figure has {n} panel(s): pass ax=None or {what}, got {ax!r}.")
    return axes[0].figure, axes


__all__ = ["HTMLView", "figure_axes"]
