"""Run by emacore.testing (the conformance kit): the tests live in
``emacore.testing.conformance.test_nonfinite``, which third-party backends run too."""

from emacore.testing.conformance.test_nonfinite import *  # noqa: F403
