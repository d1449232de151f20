"""Int8 quantization of converted models: calibration ranges, weight constants, the fit."""
