"""The command-line layer: Typer wiring (app.py), one module per command, the renderer and the
terminal helpers. Nothing outside this package imports it."""


def main() -> None:
    """The `siglip` entry point. Ctrl-C (SIGTERM) while the app is still importing (the first
    ~100 ms) ends the process quietly with 130 (143); after that, commands handle them, alike."""
    import os
    import signal

    def interrupted_early(signum, frame):
        # Nothing to clean up yet: leave at once, without unwinding half-done imports.
        os.write(2, b"siglip: error: terminated (SIGTERM)\n" if signum == signal.SIGTERM else b"siglip: error: interrupted\n")
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, interrupted_early)
    signal.signal(signal.SIGTERM, interrupted_early)
    from .app import on_interrupt, run

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)
    run()
