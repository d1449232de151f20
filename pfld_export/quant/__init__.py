"""int8 quantization: activation ranges, quantization-aware fine-tuning, int8-robust training."""
