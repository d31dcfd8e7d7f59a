"""The image tests' fixtures (synthetic kernel, real workload dumps made once and cached) for the view tests."""

from tests.image.conftest import kdump_1g, synth, synth_elf, workload_1g  # noqa: F401
