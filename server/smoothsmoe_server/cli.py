"""smoothsmoe: the command line (python -m smoothsmoe_server does the same)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smoothsmoe", description="Serve MoE models with smoothed top-k routing.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="OpenAI-compatible server (needs the vLLM integration: the serve issue)")
    args = parser.parse_args(argv)
    print(f"smoothsmoe {args.command}: the vLLM integration is not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
