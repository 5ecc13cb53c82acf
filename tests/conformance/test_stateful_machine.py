"""Run by emacore_testing (the conformance kit): the tests live in
``emacore_testing.conformance.test_stateful_machine``, which third-party backends run too."""

from emacore_testing.conformance.test_stateful_machine import *  # noqa: F403
