"""``shopmtl export``: a trained zoo model as an ONNX bundle, fp32 or int8, checked at export.

An app-layer package (tests/test_layering.py), in these parts:

- ``runtime``: the bundle's plain-tensor signature (``signature``, ``feeds``) and its forward
  by onnxruntime (``OnnxForward``), the ``predict.Forward`` that ``shopmtl.load(BUNDLE)`` scores
  with. It needs numpy and onnxruntime only: what a server will load.
- ``graph``: the PyTorch side: ``TensorModel`` (a zoo model behind that signature) and
  ``export_onnx`` (``torch.onnx.export`` + ``onnx.checker``).
- ``quantize``: int8 weights by onnxruntime's dynamic quantisation.
- ``prune``: ``--prune R``, structured pruning (experts by mean gate weight, MLP units by the
  L2 norm of their outgoing weights) into a smaller model of the same class.
- ``finetune``: ``--finetune TRAIN``, a short fine-tune of the pruned model through the one
  training loop (``train.loop.fit``) with the source's train config.
- ``scenario``: ``--scenario S``, a sub-model with S's tasks and S fixed (no scenario input),
  holding S's copy of every per-scenario weight only.
- ``checks``: what is measured at export (parity with PyTorch, AUC / logloss, size, latency).
- ``bundle``: ``export_bundle``, the command: export, check, write the bundle atomically.

onnx, onnxruntime and onnxscript are the ``export`` extra: imported where used
(``deps.require``), never at module level, so a core install imports this package.
"""
