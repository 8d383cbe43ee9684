"""Real-model testbed: SmolLM2-135M-Instruct, poisoned fine-tuning, GuardSpace and SOMF side by side."""
