"""The bars of the overview's charts: files moved per day, one chart per direction."""

from datetime import date, timedelta

CHART_DAYS = 30
#: The height of the drawing in SVG units; each day's bar is 8 units wide with 2 between.
CHART_HEIGHT = 100


def daily_bars(counts: dict[date, int], last: date, days: int = CHART_DAYS) -> list[dict]:
    """One bar per day of the `days` days up to `last`, oldest first: its day, its files and
    where it stands in the drawing, the highest day filling the height."""
    first = last - timedelta(days=days - 1)
    top = max(counts.values(), default=0) or 1
    bars = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        files = counts.get(day, 0)
        height = CHART_HEIGHT * files / top
        x, y = offset * 10 + 1, CHART_HEIGHT - height
        bars.append({"day": day, "files": files, "x": x, "y": y, "height": height})
    return bars
