"""khibernate: kexec-jump based hibernation and checkpointing for Linux."""

__version__ = "0.1.0"
