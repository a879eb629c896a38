"""Several workers' metric snapshots -> one (pure; the data of ``Registry.snapshot()``).

A snapshot is a list of families ``{name, kind, help, labelnames, series: [[values,
value]], aggregate?, buckets?}``. Merging goes by kind, never by name, so a metric
added later is covered with no code here:

* counters and histograms: summed over the live workers *and* the workers that are gone
  (``retired``), so a replaced worker never makes a total go backwards (Prometheus would
  read the drop as a counter reset);
* gauges, per their ``aggregate``: ``sum`` (open connections), ``once`` (the lowest
  worker's value: certificate expiry, the same everywhere), ``worker`` (one series per
  worker, a ``worker`` label added). A dead worker's gauges die with it.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["fold_retired", "merge_snapshots"]

Families = list[dict]


def merge_snapshots(live: Iterable[tuple[int, Families]], retired: Families = ()) -> Families:
    """One snapshot for ``live`` (worker index, families) plus the ``retired`` totals."""
    merged: dict[str, dict] = {}
    series: dict[str, dict[tuple, object]] = {}

    def family(entry: dict, extra_label: bool = False) -> dict[tuple, object]:
        name = entry["name"]
        if name not in merged:
            head = {key: value for key, value in entry.items() if key != "series"}
            if extra_label:
                head["labelnames"] = [*entry["labelnames"], "worker"]
            merged[name] = head
            series[name] = {}
        return series[name]

    for entry in retired:
        _add_all(family(entry), entry)
    for index, families in sorted(live, key=lambda item: item[0]):
        for entry in families:
            if entry["kind"] != "gauge":
                _add_all(family(entry), entry)
                continue
            aggregate = entry.get("aggregate", "worker")
            target = family(entry, extra_label=aggregate == "worker")
            for values, value in entry["series"]:
                key = tuple(values)
                if aggregate == "worker":
                    target[(*key, str(index))] = value
                elif aggregate == "sum":
                    target[key] = target.get(key, 0) + value
                else:  # once: the lowest worker that has it
                    target.setdefault(key, value)
    return [{**head, "series": [[list(key), value] for key, value in series[name].items()]}
            for name, head in merged.items()]


def fold_retired(retired: Families, dead: Families) -> Families:
    """``retired`` plus a worker that is gone: its counters and histograms only."""
    kept = [entry for entry in dead if entry["kind"] != "gauge"]
    return merge_snapshots([], [*retired, *kept]) if kept else list(retired)


def _add_all(target: dict[tuple, object], entry: dict) -> None:
    histogram = entry["kind"] == "histogram"
    for values, value in entry["series"]:
        key = tuple(values)
        before = target.get(key)
        if before is None:
            target[key] = dict(value, counts=list(value["counts"])) if histogram else value
        elif histogram:
            target[key] = {
                "counts": [a + b for a, b in zip(before["counts"], value["counts"])],
                "sum": before["sum"] + value["sum"],
                "count": before["count"] + value["count"],
            }
        else:
            target[key] = before + value
