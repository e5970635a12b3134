"""The local sandbox, ``./dev sandbox`` (the main job without Docker), and its kit.

Product code, not tests (STYLE rule 14): the integration tests and the benchmarks import
the kit from here.

- :mod:`.main`: ``python -m codetainer.sandbox`` (``./dev sandbox``);
- :mod:`.world`: network namespaces with test hosts and a test DNS server (the miniature
  Internet);
- :mod:`.scratchroot`: a scratch root filesystem in fresh namespaces, where codetainerd
  runs as PID 1 (also run by path, ``scratchroot.py --inner SPEC``, as the inner half);
- :mod:`.fullboot`: the whole daemon booted in the world (``FullBoot``, ``ApiStandIn``,
  ``GitServer``, ``proxy_boot``);
- :mod:`.apistandin` and :mod:`.standins`: stand-ins for Anthropic's API, GitHub, npm,
  PyPI and sentry.io (both also run by path with ``python -I`` in the world's namespace,
  so they import nothing from this package);
- :mod:`.daemonproc`: the daemon as an ordinary child process, and ``wait_for``.

Importing this package imports nothing else: each module is imported on its own.
"""
