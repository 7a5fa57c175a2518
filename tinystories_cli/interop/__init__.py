"""Weight mappings between our `TransformerLM` and other formats, each with its one compatibility check.

`llama`: Hugging Face `LlamaForCausalLM` (pre-norm RMSNorm, RoPE, SwiGLU) in both directions, plus its
config.json mapping. `gpt2`: `GPT2LMHeadModel` (pre-norm LayerNorm, learned positions, tanh GELU, biases)
in both directions. These depend only on the config, the checkpoint naming rules and torch; `export`
builds on them. `hfconfig` reads config.json values (typed, bounded, refusals by name); `hf` reads a
Hugging Face directory (config, safetensors weights, byte-level BPE tokenizer). Writing one as a run
directory (`tslm import`) is a pipeline one floor up, `tinystories_cli.importer`, beside `export`.
"""
