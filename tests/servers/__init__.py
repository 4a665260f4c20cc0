"""Real servers the suite starts itself, one module each (session fixtures).

Each starts its server from a pip-installed binary on a free loopback port in a
temporary directory and stops it afterwards. A server that cannot start is a
skip on a developer machine and a failure when ``CI`` is set: CI never passes
with a backend silently missing.
"""
