"""Run by emacore_testing (the conformance kit): the tests live in
``emacore_testing.conformance.test_state_dict_validation``, which third-party backends run too."""

from emacore_testing.conformance.test_state_dict_validation import *  # noqa: F403
