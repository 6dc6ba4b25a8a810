"""stderr: one-line notes and errors, a status spinner and a progress bar, only on a terminal.

stdout carries results only; everything here goes to stderr. While a progress bar is on
screen, lines are printed above it through Rich instead of being glued to the bar's line.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from typing import Callable, Iterator

_live = None  # the Rich Progress on screen, if any
_spinner = None  # (Live, Spinner) saying what the run is doing, until a progress bar or a result takes over

# Code points a terminal acts on instead of showing: C0 controls (ESC starts escape sequences,
# BEL ends OSC 8 hyperlinks, CR and BS overwrite what was shown), DEL, C1 controls (0x9b is a
# one-byte CSI), line and paragraph separators, the bidirectional overrides and isolates that
# reorder what follows (a "Trojan source" name), and lone surrogates (bytes of a file name that
# is not UTF-8).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte itself
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` safe to show on a terminal: every control character and every other code point a
    terminal would act on is written out visibly as Python writes it in a string literal
    (ESC -> `\\x1b`, BEL -> `\\x07`, CSI -> `\\x9b`, newline -> `\\n`, RIGHT-TO-LEFT
    OVERRIDE -> `\\u202e`, the undecodable byte 0xff of a file name -> `\\xff`). Everything
    else, including other scripts and emoji, is kept. Backslashes are kept as they are, so a name
    that already contains the text `\\x1b` looks the same as one with ESC in it: the JSON, CSV
    and JSON-lines outputs, which are never escaped, tell them apart."""
    if not isinstance(text, str):
        text = str(text)
    return _UNPRINTABLE.sub(_escape, text)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _line(text: str) -> None:
    """One line on stderr: names and messages in it are shown with `printable`."""
    text = printable(text)
    screen = _live if _live is not None else (_spinner[0] if _spinner is not None else None)
    if screen is not None:
        screen.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)
        return
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or full: nothing better to do
        pass


def error_line(message: str) -> None:
    _line(f"siglip: error: {message}")


def note(message: str) -> None:
    _line(f"siglip: {message}")


def truncation_note(texts: dict[str, int], max_length: int, shown: int = 3) -> str:
    """One line for the texts the engine cut to the model's length: which, and how long each was."""
    def short(text: str) -> str:
        return repr(text if len(text) <= 40 else text[:37] + "...")

    listed = ", ".join(f"{short(text)} ({count} tokens)" for text, count in list(texts.items())[:shown])
    more = f" and {len(texts) - shown} more" if len(texts) > shown else ""
    what = "text is" if len(texts) == 1 else f"{len(texts)} texts are"
    return (f"{what} longer than the model's {max_length} tokens and cut to fit, keeping the end-of-text "
            f"token last, as the reference does: {listed}{more}")


def stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def activity(message: str) -> None:
    """Say on the terminal what the run is doing now: a spinner with `message` (starting, listing
    inputs, loading the model, warming up...) from a command's first moment, so that no run looks
    stuck, until the next activity, a progress bar, a result, or the end of the command. Only when
    stderr is a terminal; stdout is never touched."""
    global _spinner
    if _live is not None or not stderr_is_terminal():
        return
    message = printable(message)
    if _spinner is None:
        from rich.live import Live
        from rich.spinner import Spinner

        spinner = Spinner("dots", text=message, style="cyan")
        live = Live(spinner, console=stderr_console(), transient=True, refresh_per_second=12.5,
                    redirect_stdout=False, redirect_stderr=False)
        live.start(refresh=True)
        _spinner = (live, spinner)
        return
    live, spinner = _spinner
    spinner.update(text=message)
    live.refresh()  # drawn now, however short the step


def end_activity() -> None:
    """Take the spinner off the screen (before results, a progress bar, or the exit)."""
    global _spinner
    if _spinner is not None:
        live, _ = _spinner
        _spinner = None
        try:
            live.stop()
        except (OSError, ValueError):
            pass


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """The spinner says `message` while something slow happens (e.g. the model loads); the next
    activity replaces it."""
    activity(message)
    yield


RATE_AFTER_S = 1.0


def _bar_delay() -> float:
    """Seconds before a bar shows ($SIGLIP_PROGRESS_DELAY, default 1): a run that ends sooner
    never shows one (no flash, nothing to garble)."""
    import os

    try:
        return max(0.0, float(os.environ.get("SIGLIP_PROGRESS_DELAY", "1")))
    except ValueError:
        return 1.0


@contextlib.contextmanager
def progress_bar(total: int, unit: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A progress bar over `total` items on stderr, only when stderr is a terminal, and only once
    the work has run for a second; yields an advance(n) function. The rate counts from the first
    finished item, so model loading before it does not drag the figure down."""
    global _live
    if not enabled or total < 2 or not stderr_is_terminal():
        try:
            yield lambda n=1: end_activity()  # the first finished item ends the warm-up spinner
        finally:
            end_activity()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ]
    # redirect_*=False: stdout carries results and must never pass through the bar
    bar = Progress(*columns, console=stderr_console(), transient=True, redirect_stdout=False, redirect_stderr=False)
    task = bar.add_task(unit, total=total, rate="")
    started = time.perf_counter()
    delay = _bar_delay()
    first: list[float] = []
    done = 0

    def advance(n: int = 1) -> None:
        global _live
        nonlocal done
        now = time.perf_counter()
        if not first:
            first.extend((now, n))
            end_activity()  # warmed up: the bar (or nothing, for a short run) takes over
        done += n
        elapsed = now - first[0]
        # Items finished since the first one(s), over a second of work at least: a batch's images
        # finish together, and one image over a microsecond is no measure of anything (the first
        # frame used to claim thousands of images/s).
        rate = f"{(done - first[1]) / elapsed:.1f} {unit}/s" if elapsed >= RATE_AFTER_S and done > first[1] else ""
        bar.update(task, completed=done, rate=rate)
        if _live is None and now - started >= delay and done < total:
            bar.start()
            _live = bar

    try:
        yield advance
    finally:
        end_activity()
        if _live is bar:
            bar.stop()
        _live = None
