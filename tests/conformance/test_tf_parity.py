"""Run by emacore.testing (the conformance kit): the tests live in
``emacore.testing.conformance.test_tf_parity``, which third-party backends run too."""

from emacore.testing.conformance.test_tf_parity import *  # noqa: F403
