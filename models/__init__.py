"""kiln.models: model sources behind one interface (kiln.models.registry): the zoo, user models
(`package.module:factory`) and Hugging Face folders; the shared types (ModelBundle, SourceRequest) in base."""
