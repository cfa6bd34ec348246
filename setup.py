"""Build hook: setuptools needs setup() to run cffi's builder for the C stack."""

from setuptools import setup

setup(cffi_modules=["tunio/_build.py:ffibuilder"])
