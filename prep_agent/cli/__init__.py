"""The ``prep-agent`` command line: ``main(argv) -> exit status``."""

from prep_agent.cli.main import main

__all__ = ["main"]
