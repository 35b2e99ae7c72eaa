"""What a model is: its folder and configs (``info``, ``folder``), the components and their facts
(``components``), the torch wrappers exported per component (``wrappers``), the tokenizer's BPE
(``bpe``) and the built-in random architectures (``random_models``)."""
