"""How the test suite builds each backend on a fresh, isolated store.

One module per backend (``tests/backends/<name>.py``) with two functions:

``queue_factory(request, tmp_path) -> MakeQueue``
    a factory whose calls within one test return queue instances on the same
    storage (see ``omniq.testing.contract``);
``result_storage(request, tmp_path) -> ResultStorage``
    a fresh result storage.

A server a backend needs is a session fixture in ``tests/servers/<name>.py``,
fetched with ``request.getfixturevalue``. Adding a backend to every contract
test is adding its name below.
"""

from __future__ import annotations

QUEUE_BACKENDS = ["memory", "sqlite", "redis", "postgres", "file", "file_memory", "s3", "nats"]
RESULT_BACKENDS = ["memory", "sqlite", "redis", "postgres", "file", "file_memory", "s3", "nats"]
