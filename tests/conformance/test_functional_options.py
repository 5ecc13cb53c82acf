"""Run by emacore.testing (the conformance kit): the tests live in
``emacore.testing.conformance.test_functional_options``, which third-party backends run too."""

from emacore.testing.conformance.test_functional_options import *  # noqa: F403
