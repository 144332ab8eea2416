"""Progress bars report into log files: rich draws nothing there until the work ends."""

import io

from rich.console import Console

from draftsmith.progress import Bar, counted, track


def log_console(buffer: io.StringIO) -> Console:
    return Console(file=buffer, force_terminal=False, width=200)


def test_a_bar_writes_plain_progress_lines_into_a_log_file():
    buffer = io.StringIO()
    with counted("features", console=log_console(buffer), every=0) as bar:
        task = bar.add_task("shards", total=4)
        bar.update(task, advance=1)
        bar.advance(task)
    lines = [line for line in buffer.getvalue().splitlines() if "elapsed" in line]
    assert lines[0].startswith("features shards: 1/4 (25%), 0:00:00 elapsed"), lines
    assert lines[1].startswith("features shards: 2/4 (50%)"), lines


def test_lines_are_spaced_out_and_never_drawn_on_a_terminal_or_when_disabled():
    def run(console: Console, every: float, disable: bool = False) -> str:
        with Bar(console=console, every=every, disable=disable) as bar:
            task = bar.add_task("decoding", total=10)
            for _ in range(10):
                bar.advance(task)
        return console.file.getvalue()

    assert run(log_console(io.StringIO()), every=0).count("decoding: ") == 9  # the last step finished the task
    assert "decoding: " not in run(log_console(io.StringIO()), every=3600)
    assert "decoding: " not in run(log_console(io.StringIO()), every=0, disable=True)
    assert "elapsed" not in run(Console(file=io.StringIO(), force_terminal=True, width=200), every=0)


def test_track_yields_every_item_and_reports_into_a_log():
    console = log_console(io.StringIO())
    assert list(track(range(3), "collecting numpy", console=console, every=0)) == [0, 1, 2]
    lines = [line for line in console.file.getvalue().splitlines() if "elapsed" in line]
    assert [line.split(",")[0] for line in lines] == ["collecting numpy: 1/3 (33%)", "collecting numpy: 2/3 (67%)"]


def test_a_log_line_is_never_wrapped():
    """A log file's console is 80 columns wide by default: a wrapped line would split the time left off."""
    console = Console(file=io.StringIO(), force_terminal=False, width=40)
    with counted("on-policy data", console=console, every=0) as bar:
        task = bar.add_task("shards", total=3)
        bar.advance(task)
    line, = [line for line in console.file.getvalue().splitlines() if "shards" in line and "elapsed" in line]
    assert line.startswith("on-policy data shards: 1/3 (33%), 0:00:00 elapsed")
