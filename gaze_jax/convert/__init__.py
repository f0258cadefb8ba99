"""Weight import: Hugging Face safetensors and GGUF -> our NNX parameters, as declarative maps
(``mapping.Rule``) plus small per-key hooks."""
