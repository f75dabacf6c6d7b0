"""One module per runtime, each declaring `SPEC` (a `kiln.core.runtime.RuntimeSpec`); the registry finds them."""
