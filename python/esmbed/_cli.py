"""The ``esmbed`` command installed with the wheel: the Rust command line, run in-process."""

from __future__ import annotations

import sys

from esmbed import _native


def main() -> None:
    sys.exit(_native.main(["esmbed", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
