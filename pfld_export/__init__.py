"""pfld-export: get a PFLD facial landmark detector onto a phone, and prove the landmarks did not move."""

import os as _os

__version__ = "0.1.0"

# No network at run time, ever. ONNX Runtime (1.32, Linux wheels included) starts a 1DS telemetry
# client when its environment is created, which looks up mobile.events.data.microsoft.com and
# leaves a .ses file in $TMPDIR. Only this variable, set before onnxruntime is first imported
# (the import creates the environment), stops it: `disable_telemetry_events()` comes too late.
# Set here, at package import, because onnxsim and onnx2tf import onnxruntime on their own.
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"
