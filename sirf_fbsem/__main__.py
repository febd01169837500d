"""``python -m sirf_fbsem`` (also under ``torchrun``) runs the command line."""
import sys

from .cli import main

sys.exit(main())
