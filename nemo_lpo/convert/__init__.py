"""HF <-> megatron-core checkpoint conversion (Mixtral, Mistral, Llama layouts)."""
