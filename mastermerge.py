"""Entry point: `python mastermerge.py --config mastermerge_config.yaml` (see README.md)."""

import sys

from nerd.cli import main

if __name__ == "__main__":
    sys.exit(main())
