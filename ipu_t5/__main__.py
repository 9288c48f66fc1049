"""`python -m ipu_t5` is the `ipu-t5` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
