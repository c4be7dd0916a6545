"""Tasks to distil on: the embedded multi-path task, its character-level tokenizer, and math grading."""
