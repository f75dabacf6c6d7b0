"""kiln.export: from a trained model to a folder of verified artifacts (recipe, variant registry, one emitter per
format, prune, quantize, verify, publish). The runtimes that load those artifacts live in kiln.core.runtime, so
bench, serve and deploy open them without importing this room."""
