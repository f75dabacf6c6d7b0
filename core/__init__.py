"""What every room of kiln shares: the error tree, the signature and its dtype table, the typed manifest, the
runtime registry, manifest-driven preprocessing and the machine's description. Imports nothing above it."""
