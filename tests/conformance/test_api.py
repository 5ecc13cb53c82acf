"""Run by emacore.testing (the conformance kit): the tests live in
``emacore.testing.conformance.test_api``, which third-party backends run too."""

from emacore.testing.conformance.test_api import *  # noqa: F403
