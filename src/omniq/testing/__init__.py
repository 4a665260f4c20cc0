"""Test helpers shipped with OmniQ: the contract suite every queue backend passes.

Use it for a backend of your own (fsspec-style)::

    # tests/test_my_backend.py
    import pytest
    from omniq.testing import TaskQueueContract

    class TestMyQueue(TaskQueueContract):
        @pytest.fixture
        def make_queue(self, tmp_path):
            def make(**options):
                return MyTaskQueue(location=tmp_path, **options)
            return make
"""

from .contract import TaskQueueContract

__all__ = ["TaskQueueContract"]
