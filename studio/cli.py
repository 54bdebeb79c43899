"""`lora-studio`: no arguments opens the window; sub-commands run headless (train, inspect, demo, ...)."""

from __future__ import annotations

import argparse
import importlib
import sys

from studio.app_info import APP_EXECUTABLE, APP_NAME, VERSION

# Each name is a module in studio.commands with add_parser(subparsers) and run(args) -> int.
COMMANDS = ("train", "demo", "inspect", "merge", "lora", "caption", "grid", "screenshots")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=APP_EXECUTABLE, description=f"{APP_NAME}: train Stable Diffusion LoRAs. Run without arguments to open the window."
    )
    parser.add_argument("--version", action="version", version=f"{APP_NAME} {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"studio.commands.{name}")
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from studio.display_check import check_display

        # Before Qt is imported: a missing system library or no display is a sentence and exit 1, not Qt's SIGABRT.
        problem = check_display()
        if problem:
            print(problem, file=sys.stderr)
            return 1
        from studio.ui.app import main as gui_main

        return gui_main([])
    args = build_parser().parse_args(argv)
    if not getattr(args, "_run", None):
        build_parser().print_help()
        return 2
    return int(args._run(args) or 0)
