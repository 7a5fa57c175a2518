"""Weight mappings between our `TransformerLM` and other formats, each with its one compatibility check.

`llama`: Hugging Face `LlamaForCausalLM` (pre-norm RMSNorm, RoPE, SwiGLU) in both directions. This floor
depends only on the config, the checkpoint naming rules and torch; `export` (and `import`) build on it.
"""
