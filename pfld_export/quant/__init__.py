"""int8 quantization: calibration, weight fixes, sensitivity, mixed precision, QAT and int8-robust training.

Modules, leaves first (each imports only the ones above it):

    ranges       activation range methods (minmax, mse, percentile:P)
    budget       Int8Budget: the shift / NME / float-op / size / latency limits and their defaults
    recipes      INT8_RECIPES: the ways to build an int8 model (weight fix, ranges, mixed search)
    options      the choices and defaults of `pfld-export qat` (no torch: the CLI reads them)
    graph        calibrated TFLite graphs: calibration, selective quantization, op listing, timing
    equalize     exact float rewrites of the weights (cross-layer equalisation, bias correction)
    constants    a weight variant written into a calibrated flatbuffer (no second conversion)
    residual     the mean-shape residual head (FC predicts y - mean; mean added back in float)
    sensitivity  per-op int8 sensitivity sweep
    search       mixed-precision search (which ops stay float)
    qat          quantization-aware fine-tuning (`pfld-export qat`): the int8 simulator and its training
    noise        int8-robust training (`pfld-export train --int8-noise K`)
    fit          the int8 fitter `convert` calls, and the budget checks on its result
"""
