"""Run by emacore.testing (the conformance kit): the tests live in
``emacore.testing.conformance.test_state_dict_validation``, which third-party backends run too."""

from emacore.testing.conformance.test_state_dict_validation import *  # noqa: F403
