"""The loopback guard of the tests' child processes (see `sitecustomize`)."""
