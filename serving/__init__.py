"""What ``service.py`` is made of: settings, the upload gate, the ONNX runtime, telemetry, schema.

Imports go one way: ``settings`` ← ``schema`` ← ``telemetry`` ← ``uploads`` ← ``runtime`` ←
``gate`` ← ``service.py``; every private BentoML name is in ``bentoml_bridge``.
"""
