"""rim: Reasoning in Memory (RiM), latent reasoning with memory blocks for Hugging Face causal LMs."""

__version__ = "0.1.0"
