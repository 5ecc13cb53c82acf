"""Run by emacore.testing (the conformance kit): the tests live in
``emacore.testing.conformance.test_checkpoint``, which third-party backends run too."""

from emacore.testing.conformance.test_checkpoint import *  # noqa: F403
