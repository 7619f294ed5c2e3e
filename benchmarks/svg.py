"""Small SVG charts for the benchmark reports, without a plotting library: panels side by side, each a set of
series drawn as points joined by lines against a shared legend."""

from __future__ import annotations

from dataclasses import dataclass, field

WIDTH, HEIGHT, PAD = 260, 200, 36


@dataclass
class Series:
    name: str
    colour: str
    points: list[tuple[float, float]]
    joined: bool = True  # a line through the points (sorted by x), or the points alone


@dataclass
class Panel:
    title: str
    x_label: str
    x_range: tuple[float, float]
    series: list[Series] = field(default_factory=list)


def panels_svg(panels: list[Panel], legend: dict[str, str]) -> str:
    """The panels side by side, then `legend` (name -> colour) along the bottom; a panel with no points is left out
    blank."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(panels) * WIDTH}" height="{HEIGHT + 30}">']
    for index, panel in enumerate(panels):
        values = [v for series in panel.series for _, v in series.points]
        if not values:
            continue
        low, high = min(values), max(values)
        low, high = low - 0.05 * (high - low or 1), high + 0.05 * (high - low or 1)
        left, (x_low, x_high) = index * WIDTH, panel.x_range

        def x(value, left=left, x_low=x_low, x_high=x_high):
            return left + PAD + (WIDTH - 2 * PAD) * (value - x_low) / (x_high - x_low)

        def y(value, low=low, high=high):
            return HEIGHT - PAD + (2 * PAD - HEIGHT) * (value - low) / (high - low)

        parts.append(f'<text x="{left + WIDTH / 2}" y="14" font-size="12" text-anchor="middle">{panel.title}</text>')
        parts.append(f'<line x1="{x(x_low)}" y1="{y(low)}" x2="{x(x_high)}" y2="{y(low)}" stroke="#888"/>')
        parts.append(
            f'<text x="{left + WIDTH / 2}" y="{HEIGHT - 6}" font-size="10" text-anchor="middle">{panel.x_label}</text>'
        )
        for tick in (low, high):
            parts.append(f'<text x="{left + 4}" y="{y(tick)}" font-size="9">{tick:.3g}</text>')
        for series in panel.series:
            points = sorted(series.points)
            if series.joined and len(points) > 1:
                path = " ".join(f"{x(m):.1f},{y(v):.1f}" for m, v in points)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{series.colour}" stroke-width="2"/>')
            for m, v in points:
                parts.append(f'<circle cx="{x(m):.1f}" cy="{y(v):.1f}" r="3" fill="{series.colour}"/>')
    offset = 10
    for name, colour in legend.items():
        parts.append(f'<text x="{offset}" y="{HEIGHT + 24}" font-size="11" fill="{colour}">{name}</text>')
        offset += 7 * len(name) + 20
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
