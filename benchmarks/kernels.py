"""Entry point for the kernel speed benchmark: same as `longattn bench kernels [--quick]`."""

import sys

from longattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
