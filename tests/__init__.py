"""The test suite, a package: tests and benchmarks import its kits as ``tests.kit`` etc.

``tests.kit`` is the one shared kit (the fake institute, configs, real ``prep-agent``
processes, waiting, ``ssh-keygen -Y verify``); the other ``*kit`` modules add what
one group of tests needs (a browser, nginx, SFTP, the packages, the collector...).
"""
