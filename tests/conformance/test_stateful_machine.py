"""Run by emacore.testing (the conformance kit): the tests live in
``emacore.testing.conformance.test_stateful_machine``, which third-party backends run too."""

from emacore.testing.conformance.test_stateful_machine import *  # noqa: F403
