"""Run by emacore.testing (the conformance kit): the tests live in
``emacore.testing.conformance.test_intervals``, which third-party backends run too."""

from emacore.testing.conformance.test_intervals import *  # noqa: F403
