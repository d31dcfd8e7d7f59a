"""The synthetic kernel fixtures of tests/image, for restore tests."""

from tests.image.conftest import synth, synth_elf  # noqa: F401 - pytest fixtures
