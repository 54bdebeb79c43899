"""Sub-commands of `lora-studio`; each module has ``add_parser(subparsers)`` and ``run(args) -> int``."""
