"""The `doctor` command: what this machine measured once and keeps (weight-format choices with their margins,
cost calibrations, layer-skip searches), and a reset that makes the next run measure them again."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from draftsmith.paths import cache_dir

# the cache folder's tables of measured choices (paths.cached_entry writes them)
MEASURED_TABLES = {
    "weight_formats.json": "weight formats and attention dtypes (cached_lm.choose_format)",
    "calibration.json": "step cost curves for adaptive draft lengths (adaptive.calibrated_costs)",
    "layerskip.json": "layer-skip searches (layer_search)",
}


def describe(value) -> str:
    """One line for a cached value: a format choice with its margin and times, a cost curve, or the JSON."""
    if isinstance(value, dict) and "choice" in value:
        margin = value.get("margin")
        why = ("no timing kept" if margin is None else
               f"won by {margin:+.1%}" if margin >= 0 else f"kept by preference ({-margin:.1%} slower than the fastest)")
        times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in value.get("ms", {}).items())
        return f"{value['choice']}: {why}" + (f" ({times})" if times else "")
    if isinstance(value, dict) and "seconds" in value:
        return ", ".join(f"{n} tok {s * 1e3:.3g} ms" for n, s in zip(value.get("sizes", []), value["seconds"]))
    return f"{value} (measured once, no margin recorded)" if isinstance(value, str) else json.dumps(value)[:160]


def doctor_command(
    reset: Annotated[bool, typer.Option(help="Delete the cached choices and calibrations: the next run measures "
                                             "them again (on a quiet machine, for numbers worth keeping).")] = False,
) -> None:
    """Show what this machine measured once and keeps (weight formats and why, step costs), or reset it."""
    console, folder = Console(), cache_dir()
    for name, what in MEASURED_TABLES.items():
        path = folder / name
        if reset:
            existed = path.is_file()
            path.unlink(missing_ok=True)
            console.print(f"{'removed' if existed else 'nothing cached in'} {path}")
            continue
        table = Table(title=f"{what}: {path}", show_lines=False, title_justify="left")
        table.add_column("measured for", overflow="fold", max_width=70)
        table.add_column("kept", overflow="fold")
        try:
            entries = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError) as e:
            console.print(f"[red]{path} is unreadable ({e}): `draftsmith doctor --reset` removes it[/red]")
            continue
        for key, value in entries.items():
            table.add_row(key, describe(value))
        console.print(table if entries else f"{what}: nothing measured yet ({path})")


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)
