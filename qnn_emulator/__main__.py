"""`python -m qnn_emulator`: serve the emulator until SIGTERM/SIGINT."""

import sys

from qnn_emulator.cli import main

sys.exit(main())
