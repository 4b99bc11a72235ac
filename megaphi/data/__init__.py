"""Data: the Phi-4 tokenizer, indexed-dataset preprocessing, mixtures and loaders."""
