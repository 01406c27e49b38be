"""What a run folder holds for the comparison: its ``metrics.json``, read defensively, and whether the run finished.

Planning (skip, resume or refuse a folder), launching (which runs finished) and the table all read run
folders through here, so a damaged file is judged the same way at every step.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.json"
LOG_FILE = "compare.log"


def load_metrics(folder: Path) -> tuple[dict | None, str | None]:
    """``(metrics, None)`` for the folder's metrics.json with at least one validation; ``(None, None)`` with no
    such file or no validation yet (a run not started or not that far); ``(None, reason)`` for a file that is
    there but is not a run's metrics (truncated, damaged, another file's content), which must not pass for an
    absent run: a comparison without it would drop a method unnoticed."""
    path = folder / METRICS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return None, f"cannot be read ({err.strerror or err})"
    try:
        data = json.loads(text)
    except ValueError as err:
        return None, f"not valid JSON, truncated or damaged: {err}"
    if not isinstance(data, dict):
        return None, f"holds a JSON {type(data).__name__}, not a run's metrics object"
    history = data.get("history")
    if not history:
        return None, None
    if not isinstance(history, list) or not all(isinstance(h, dict) and _is_number(h.get("epoch")) for h in history):
        return None, "its history is not a list of validations with their epochs"
    wrong = [k for k in ("settings", "best", "zero_shot") if not isinstance(data.get(k) or {}, dict)]
    if wrong:
        return None, f"its {', '.join(wrong)} {'is not an object' if len(wrong) == 1 else 'are not objects'}"
    return data, None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(folder: Path) -> dict | None:
    """The folder's metrics.json with at least one validation, or None (absent, not validated yet, or unreadable)."""
    return load_metrics(folder)[0]


def finished(data: dict) -> bool:
    epochs = (data.get("settings") or {}).get("epochs")
    return epochs is None or data["history"][-1]["epoch"] >= epochs
