"""The μP coordinate check's table, plot and files (`llmjax mup-check`; the numbers: `scaling.mup_check`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmjax.scaling.mup_check import spread

KINDS = {"act": "RMS of the output", "delta": "RMS of the output's change since initialisation"}


def _names(check: dict[str, Any]) -> list[str]:
    first = next(iter(check["results"].values()))
    return list(next(iter(first.values()))["act"])


def table(check: dict[str, Any], kind: str = "act", step: int = -1) -> str:
    """A text table: one row per module output, per parametrization its `kind` RMS at each width after
    `step` and max/min over the widths."""
    widths, params = check["widths"], list(check["results"])
    shown = check["steps"] if step == -1 else step
    head = f"{KINDS[kind]} after step {shown} (lr {check['lr']:g}, {check['optimizer']}, muP base width " \
           f"{check['base_width']})"
    cols = [f"{w:>8d}" for w in widths] + ["  max/min"]
    lines = [head, f"{'':24s}" + "".join(f"{p:^{9 * len(widths) + 9}s}" for p in params),
             f"{'output':24s}" + "".join("".join(cols) for _ in params)]
    ratios = {p: spread(check, p, kind, step) for p in params}
    for name in _names(check):
        row = f"{name:24s}"
        for p in params:
            row += "".join(f"{check['results'][p][w][kind][name][step]:8.3g} " for w in widths)
            row += f"{ratios[p][name]:8.2f} "
        lines.append(row.rstrip())
    return "\n".join(lines)


def _plotted(name: str) -> bool:
    """The outputs drawn: the embedding, each block's attention, feed-forward and residual output, the logits
    (not norms, whose RMS is fixed, nor the projections inside attention and the MLP: they are in the table)."""
    parts = name.split("/")
    inner = parts[1:] if parts[0].startswith("layer") else parts
    return len(inner) <= 1 and not (inner and inner[-1].endswith("norm"))


def plot(check: dict[str, Any], out: Path) -> list[Path]:
    """coord_check.png/.svg: rows = parametrizations, columns = act / delta after the last step, x = width."""
    from llmjax.scaling.plots import pyplot

    plt = pyplot()
    params, widths = list(check["results"]), check["widths"]
    fig, axes = plt.subplots(len(params), 2, figsize=(11, 3.8 * len(params)), layout="constrained", squeeze=False,
                             sharex=True)
    names = [n for n in _names(check) if _plotted(n)]
    cmap = plt.get_cmap("tab20")
    for i, p in enumerate(params):
        for j, kind in enumerate(KINDS):
            ax = axes[i][j]
            for k, name in enumerate(names):
                ys = [check["results"][p][w][kind][name][-1] for w in widths]
                ax.plot(widths, ys, "o-", ms=3, color=cmap(k % 20), label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{p}: {KINDS[kind]} after step {check['steps']}", fontsize=9)
            ax.set_xlabel("width (d_model)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][1].legend(fontsize=6, ncol=2, loc="best")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "coord_check.png", out / "coord_check.svg"]
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths


def write(check: dict[str, Any], out: Path) -> list[Path]:
    """coord_check.json (every number), coord_check.txt (both tables) and the plot under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    data = {**check, "results": {p: {str(w): r for w, r in per.items()} for p, per in check["results"].items()}}
    (out / "coord_check.json").write_text(json.dumps(data, indent=1))
    (out / "coord_check.txt").write_text(table(check, "act") + "\n\n" + table(check, "delta") + "\n")
    return [out / "coord_check.json", out / "coord_check.txt", *plot(check, out)]
