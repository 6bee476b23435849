"""Reading and writing model checkpoints: Hugging Face directories, and the reference resolver."""
