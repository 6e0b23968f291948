"""The test suite (a package, so `tests.*` imports resolve here, not to a dependency that ships `tests`)."""
