"""Write an F32 copy of a GGUF model: the same weights, dequantized, and the same metadata.

llama.cpp's CPU backend rounds the activations to 8 bits before each product
with a quantized weight matrix. Any change of a K/V cache, however small,
changes those roundings downstream. On Gemma 3 270M Q4_K_M that alone gives
a KL divergence of about 0.005 nats per token against the unchanged cache,
for one f16 step on every element (`quality_metrics.nudged_card`). With F32
weights those products take the activations unrounded, and the same change
gives about 0.000004.
The F32 copy therefore shows a card's own error where the quantized model
hides it under that floor. It is four times the size and runs the same
weights: the values the quantized file encodes.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

# Metadata the writer sets itself (the architecture) or that describes the file, not the model.
_SKIPPED_KEYS = ("general.architecture", "general.file_type")


def write_f32_copy(source: str | Path, target: str | Path) -> Path:
    """Write `target`, a GGUF file with every tensor of `source` dequantized to F32.

    Metadata is copied unchanged except `general.file_type`, set to all-F32.

    Raises:
        ValueError: when a tensor has a type that `gguf` cannot dequantize.
    """
    reader = gguf.GGUFReader(source)
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise ValueError(f"{source}: missing general.architecture key; expected a GGUF model file")
    writer = gguf.GGUFWriter(target, str(arch_field.contents()))
    try:
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name in _SKIPPED_KEYS:
                continue
            value_type = field.types[0]
            if value_type == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(name, field.contents(), value_type, sub_type=field.types[-1])
            else:
                writer.add_key_value(name, field.contents(), value_type)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for tensor in reader.tensors:
            try:
                values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as error:
                raise ValueError(
                    f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot dequantize"
                ) from error
            # GGUF lists dimensions fastest first; numpy wants them slowest first.
            shape = tuple(int(n) for n in reversed(tensor.shape))
            writer.add_tensor(tensor.name, np.ascontiguousarray(values, dtype=np.float32).reshape(shape))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return Path(target)
