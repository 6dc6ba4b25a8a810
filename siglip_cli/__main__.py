"""`python -m siglip_cli`. Ctrl-C from the first statement on is one quiet line and exit 130:
the handler goes in before anything else is imported (cli.main() then takes over)."""

import os
import signal

signal.signal(signal.SIGINT, lambda signum, frame: (os.write(2, b"siglip: error: interrupted\n"), os._exit(130)))
signal.signal(signal.SIGTERM, lambda signum, frame: (os.write(2, b"siglip: error: terminated (SIGTERM)\n"), os._exit(143)))

from .cli import main  # noqa: E402

main()
