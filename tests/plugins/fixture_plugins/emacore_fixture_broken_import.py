"""A plugin module that cannot be imported, as one whose native dependency is missing."""

raise ImportError("emacore_fixture_broken_import needs libtoy.so, which is not installed")
