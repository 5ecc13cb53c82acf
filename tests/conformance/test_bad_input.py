"""Run by emacore.testing (the conformance kit): the tests live in
``emacore.testing.conformance.test_bad_input``, which third-party backends run too."""

from emacore.testing.conformance.test_bad_input import *  # noqa: F403
