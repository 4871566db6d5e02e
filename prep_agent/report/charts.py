"""The report's charts, drawn with matplotlib and embedded as inline SVG."""

from __future__ import annotations

import io
from datetime import datetime
from typing import Any

WINDOW_LABELS = {"baseline": "Referencia (habitual)", "operation": "Operación del PREP"}
"""Spanish names of the windows in legends."""

COLORS = {"baseline": "#8c8c8c", "operation": "#1f5fa8", "bots": "#d9822b"}
"""Colours: grey for the usual traffic, blue for the PREP, orange for bots."""


def _pyplot() -> Any:
    import matplotlib  # type: ignore[import-untyped]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-untyped]

    plt.rcParams.update(
        {
            "svg.fonttype": "path",
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def hourly_chart(hours: list[dict[str, Any]], title: str) -> str:
    """Stacked bars of hits per hour (people, bots) with visits and pages as lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 3.4))
    try:
        times = [datetime.fromisoformat(h["hour"]) for h in hours]
        people = [h["hits"] for h in hours]
        bots = [h["bot_hits"] for h in hours]
        width = 1 / 24 * 0.9
        ax.bar(times, people, width=width, color=COLORS["operation"], label="Hits (personas)")
        ax.bar(times, bots, width=width, bottom=people, color=COLORS["bots"], label="Hits (robots)")
        ax.set_ylabel("Hits por hora")
        ax2 = ax.twinx()
        ax2.plot(times, [h["visits"] for h in hours], color="#2a9d4b", label="Visitas")
        ax2.plot(times, [h["pages"] for h in hours], color="#7b3fa0", label="Páginas")
        ax2.set_ylabel("Visitas / páginas por hora")
        ax2.spines["right"].set_visible(True)
        ax.set_title(title)
        handles = ax.get_legend_handles_labels()
        handles2 = ax2.get_legend_handles_labels()
        ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper left", ncol=4)
        fig.autofmt_xdate()
        if times:
            import matplotlib.dates as mdates  # type: ignore[import-untyped]

            ax.xaxis.set_major_formatter(mdates.DateFormatter("%d/%m %H:%M", tz=times[0].tzinfo))
        return _svg(fig)
    finally:
        plt.close(fig)


def daily_chart(days: dict[str, list[dict[str, Any]]]) -> str:
    """Bars per day of visits, pages and hits for both windows."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.0))
    try:
        for ax, (figure, label) in zip(
            axes, (("visits", "Visitas"), ("pages", "Páginas"), ("hits", "Hits"))
        ):
            labels: list[str] = []
            values: list[int] = []
            colors: list[str] = []
            for name in ("baseline", "operation"):
                for d in days[name]:
                    labels.append(d["date"][8:10] + "/" + d["date"][5:7])
                    values.append(d[figure])
                    colors.append(COLORS[name])
            ax.bar(range(len(values)), values, color=colors)
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels(labels, rotation=45)
            ax.set_title(f"{label} por día")
        from matplotlib.patches import Patch  # type: ignore[import-untyped]

        fig.legend(
            handles=[Patch(color=COLORS[n], label=WINDOW_LABELS[n]) for n in WINDOW_LABELS],
            loc="lower center",
            ncol=2,
            bbox_to_anchor=(0.5, -0.08),
        )
        fig.tight_layout()
        return _svg(fig)
    finally:
        plt.close(fig)
