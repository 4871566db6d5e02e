"""prep-agent: publishes signed PREP result cuts for an official difusor."""

__version__ = "0.1.0"
