"""The decoder's native fast path, ``segs/intake/_fastscan.c``, and the compact meter-id
interner, ``segs/intake/_names.c``; the rest is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds, and
``segs.intake.decode`` runs its Python paths (same results, about 2.5x slower; the supervisor
warns) and meter ids in a dict of str (about 150 bytes more a meter).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("segs.intake._fastscan",
                             ["segs/intake/_fastscan.c", "segs/intake/_names.c"],
                             depends=["segs/intake/_names.h"],
                             extra_compile_args=["-O2"], optional=True)])
