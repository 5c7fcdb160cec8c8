"""`python -m dotmac_core doctor`: the command line (see `dotmac_core.doctor`)."""

from __future__ import annotations

import sys


def main() -> int:
    """Dispatch `python -m dotmac_core COMMAND`; return the exit status."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(
            "usage: python -m dotmac_core doctor [--strict] [--timeout SECONDS]\n\n"
            "  doctor  check the database, cache and security settings from the "
            "environment\n"
        )
        return 0 if args else 2
    if args[0] != "doctor":
        sys.stderr.write(f"unknown command {args[0]!r}: the command is 'doctor'\n")
        return 2
    from .doctor import main as doctor

    return doctor(args[1:])


if __name__ == "__main__":
    sys.exit(main())
