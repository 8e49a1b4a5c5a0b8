"""Models: one model identity, the encoders (torch, ONNX), precision, the text tower export, the tokenizer."""
