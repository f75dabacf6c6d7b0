"""kiln.deploy: files that take an artifact folder to another serving stack, written from its manifest alone.

`kiln deploy triton` writes a Triton model repository (config.pbtxt + the artifact, byte for byte);
`kiln deploy kserve` writes a KServe ServingRuntime and InferenceService that run `kiln serve` in the kiln image.
Both read the manifest, and the bench.json and loadtest.json beside it when present (kiln.deploy.common, which
also sizes a replica from them). They import neither torch nor the running server: only kiln serve's defaults
(kiln.serve.server.ServeConfig, so Triton batches as kiln serve would), so they run in a serve-only install.
"""
