"""kiln.export: from a trained model to a folder of verified artifacts, and the runtime that loads them."""
