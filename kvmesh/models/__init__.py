"""Where models come from: GGUF checkpoints imported into Hugging Face directories
(`gguf`), and what `--model` / `model.path` names (`resolve`: a directory, a .gguf file
imported once into a cache, or a short name such as `smollm2`)."""
