"""The one compiled part of lowrank: export/_q8.c, the Q8_0 kernel of `lowrank export` (see that file).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler the
install goes on and export/quants.py quantizes in numpy, with the same bytes at about twice the time.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("lowrank.export._q8", ["export/_q8.c"], optional=True,
                             extra_compile_args=["-O3", "-ffp-contract=off"])])
