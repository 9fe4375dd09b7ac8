"""Hugging Face interoperability: export a moetron checkpoint as a transformers model folder (interop/export.py,
with the custom model class of interop/remote/ for what no transformers architecture holds exactly), import a
dense GPT-2 or StableLM/Llama-style folder back, and upcycle a dense checkpoint into an MoE (interop/hf_import.py)."""
