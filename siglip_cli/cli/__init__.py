"""The command-line layer: Typer wiring (app.py), one module per command, the renderer and the
terminal helpers. Nothing outside this package imports it."""


def main() -> None:
    """The `siglip` entry point. Ctrl-C while the app is still importing (the first ~100 ms) ends
    the process quietly with 130; after that, commands handle it themselves."""
    import os
    import signal

    def interrupted_early(signum, frame):
        # Nothing to clean up yet: leave at once, without unwinding half-done imports.
        os.write(2, b"siglip: error: interrupted\n")
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted_early)
    from .app import on_interrupt, run

    signal.signal(signal.SIGINT, on_interrupt)
    run()
