"""The evaluation's report: statistics, the comparison table (printed and as text) and the
training curves plot (proxy reward, gold, KL per step) of a run's ``metrics.jsonl``.

Pure functions of numbers already computed; the generation and scoring that produce them are
``rlhf_ray.evaluate``'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

CURVES = (("reward/mean", "proxy reward (reward model)"), ("reward/gold", "gold score"), ("kl/mean", "KL to reference"))


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for fewer than two values)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(var / len(finite))


def table_rows(results: dict[str, dict], temperature: float) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (numbers formatted)."""
    t = f"T={temperature:g}"
    header = ["policy", f"gold {t}", f"exact {t}", "gold greedy", "exact greedy"]
    with_rm = any("reward_model" in r["sampled"] for r in results.values())
    if with_rm:
        header += [f"RM {t}", "RM greedy"]
    header += [f"KL {t}", "len"]
    rows = []
    for name, r in results.items():
        s, g = r["sampled"], r["greedy"]
        row = [name, f"{s.get('gold', math.nan):.3f} ± {s.get('gold_se', math.nan):.3f}", f"{s.get('exact', math.nan):.3f}",
               f"{g.get('gold', math.nan):.3f}", f"{g.get('exact', math.nan):.3f}"]
        if with_rm:
            row += [f"{s.get('reward_model', math.nan):.3f}", f"{g.get('reward_model', math.nan):.3f}"]
        row += [f"{s['kl']:.3f}", f"{s['response_len']:.1f}"]
        rows.append(row)
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table (columns padded to their widest cell)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def print_table(header: list[str], rows: list[list[str]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich ships with ray[default]
        print(title + "\n" + format_table(header, rows))
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.width = max(console.width, 132)  # no wrapped cells in logs and narrow captures
    console.print(table)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a run's metrics.jsonl (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def rolling_mean(values: list[float], k: int) -> list[float]:
    """Mean of the last ``k`` values at each position (fewer at the start)."""
    return [sum(values[max(0, i - k + 1) : i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(values))]


def plot_curves(rows: list[dict], out: Path, title: str = "", smooth: int = 10) -> Path:
    """Proxy reward, gold and KL per step (with a rolling mean), one panel each, to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.3))
    for ax, (key, label) in zip(axes, CURVES, strict=True):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker=".", linewidth=0.6, alpha=0.35, label="per step")
            ax.plot(steps, rolling_mean(list(values), smooth), linewidth=2, label=f"mean of {smooth}")
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
