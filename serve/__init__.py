"""kiln.serve: the server only. A LitServe server over an artifact folder, with V2 and /predict routes."""
