"""The test suite (a package, so `tests.*` imports resolve here and not to a dependency that ships a `tests` package)."""
