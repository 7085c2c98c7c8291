"""The README's settings table says the defaults the code has (every numeric default, every row)."""
from __future__ import annotations

import re
from pathlib import Path

from tasks.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| (`SONGPIPE_[^|]+) \| ([^|]+) \|", re.M)


def numeric_defaults() -> list[tuple[str, float]]:
    """(Settings field, the README's numeric default) for every setting whose README default is a number."""
    found = []
    for names_cell, defaults_cell in ROW.findall(README.read_text()):
        names = re.findall(r"`SONGPIPE_([A-Z0-9_]+)`", names_cell)
        defaults = [d.strip() for d in defaults_cell.split(" / ")]
        if len(defaults) != len(names):
            defaults = [defaults_cell.strip()] if len(names) == 1 else []
        for name, default in zip(names, defaults):
            number = re.match(r"^`?(-?\d+(?:\.\d+)?)`?(?:\s|$)", default)
            if number and name.lower() in Settings.model_fields:
                text = number.group(1)
                value = int(text, 8) if re.fullmatch(r"0[0-7]+", text) else float(text)  # 0644: a file mode
                found.append((name.lower(), float(value)))
    return found


def test_every_numeric_default_in_the_readme_is_the_settings_default():
    pairs = numeric_defaults()
    names = {name for name, _ in pairs}
    assert {"gpu_batch_slots", "token_checkpoint_frames", "max_queued_jobs", "web_workers"} <= names, names
    wrong = {name: (readme, Settings.model_fields[name].default) for name, readme in pairs
             if float(Settings.model_fields[name].default) != readme}
    assert wrong == {}
