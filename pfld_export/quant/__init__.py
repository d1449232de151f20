"""int8 quantization of calibrated TFLite models: graph rewrites around the converter's quantizer."""
