"""Hugging Face interop: Phi-3/Phi-4 (``Phi3ForCausalLM``) checkpoints to and from megaphi.

- :mod:`megaphi.hf.mapping`: pure functions between Hugging Face tensor names, layouts and
  ``config.json`` and megaphi's global parameter names, Megatron's TP=1 layouts and
  :class:`~megaphi.config.ModelConfig` (no I/O, no process groups).
- :mod:`megaphi.hf.convert`: streaming import into a distributed checkpoint and export of any
  checkpoint to a ``from_pretrained``-loadable directory.
- :mod:`megaphi.hf.tokenizer`: the Phi-4 tokenizer files (``tokenizer.json`` and friends),
  built offline from tiktoken's cl100k_base ranks.

Importing this package imports neither transformers nor Megatron-Core.
"""
