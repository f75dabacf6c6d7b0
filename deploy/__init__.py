"""kiln.deploy: files that take an artifact folder to another serving stack, written from its manifest alone.

`kiln deploy triton` writes a Triton model repository (config.pbtxt + the artifact, byte for byte);
`kiln deploy kserve` writes a KServe ServingRuntime and InferenceService that run `kiln serve` in the kiln image.
Both read the manifest, and the bench.json and loadtest.json beside it when present, and import neither torch nor
the server: they run in a serve-only install.
"""
