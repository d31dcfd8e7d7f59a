"""Builds the native page kernel (cffi API mode) at install time; everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["src/khibernate/native/build.py:ffibuilder"])
