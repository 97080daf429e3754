"""The only package that imports torch, transformers and peft."""
