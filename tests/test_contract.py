"""The contract suite (``omniq.testing``) run on every backend of ``conftest.QUEUE_BACKENDS``."""

from __future__ import annotations

import pytest

from omniq.testing.contract import MakeQueue, OmniQContract, TaskQueueContract


class TestTaskQueueContract(TaskQueueContract):
    @pytest.fixture
    def make_queue(self, queue_factory: MakeQueue) -> MakeQueue:
        return queue_factory


class TestOmniQContract(OmniQContract):
    @pytest.fixture
    def make_queue(self, queue_factory: MakeQueue) -> MakeQueue:
        return queue_factory
