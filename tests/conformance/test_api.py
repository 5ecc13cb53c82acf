"""Run by emacore_testing (the conformance kit): the tests live in
``emacore_testing.conformance.test_api``, which third-party backends run too."""

from emacore_testing.conformance.test_api import *  # noqa: F403
