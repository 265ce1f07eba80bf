"""Export of a trained student: the Hugging Face directory and its model card."""
