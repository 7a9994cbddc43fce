"""Registry: saved models (safetensors + model card) and the champion gate with its history."""
