"""Chain-of-thought fine-tuning: arguments, models, the run, generation-based evaluation, the offline demo."""
