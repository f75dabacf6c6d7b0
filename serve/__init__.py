"""kiln.serve: a LitServe server over an artifact folder, and a load tester for it."""
