"""Only what pyproject.toml cannot say: the relay's optional C fast path (supervisor/frontdoor/
fastrelay.c, libc only, loaded with ctypes). Without a C compiler the install goes on without it
and the front door relays through Python (it logs which)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("supervisor.frontdoor._fastrelay", ["supervisor/frontdoor/fastrelay.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"], optional=True)])
