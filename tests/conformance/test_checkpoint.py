"""Run by emacore_testing (the conformance kit): the tests live in
``emacore_testing.conformance.test_checkpoint``, which third-party backends run too."""

from emacore_testing.conformance.test_checkpoint import *  # noqa: F403
