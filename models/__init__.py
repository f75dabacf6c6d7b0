"""kiln.models: the model zoo and the loader for user models (`package.module:factory`)."""
