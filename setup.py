"""The decoder's native fast path, ``segs/intake/_fastscan.c``; the rest is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds, and
``segs.intake.decode`` runs its Python paths (same results, about 2.5x slower; the supervisor
warns).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("segs.intake._fastscan", ["segs/intake/_fastscan.c"],
                             extra_compile_args=["-O2"], optional=True)])
