"""Run by emacore.testing (the conformance kit): the tests live in
``emacore.testing.conformance.test_exact_large``, which third-party backends run too."""

from emacore.testing.conformance.test_exact_large import *  # noqa: F403
