"""`python -m convert inspect FILE.gguf`: metadata, tensor types, and bytes per layer (experts vs the rest).

Per-layer sizes come from offload.gguf_shape (the planner's own reader, which follows split files); the
metadata listing from gguf.GGUFReader. Only headers are read; long arrays (the vocabulary) are summarized.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from offload.gguf_shape import GgufError, read_model_shape

_ARRAY_ITEMS_SHOWN = 8


class InspectError(ValueError):
    """The file cannot be read as a GGUF."""


@dataclass(frozen=True)
class TypeCount:
    type_name: str
    n_tensors: int
    n_bytes: int


@dataclass(frozen=True)
class LayerBytes:
    index: int
    mixer: str  # "attention" or "ssm" (recurrent)
    expert_bytes: int
    other_bytes: int


@dataclass(frozen=True)
class Inspection:
    path: Path
    n_files: int
    architecture: str
    metadata: tuple[tuple[str, str], ...]
    types: tuple[TypeCount, ...]
    layers: tuple[LayerBytes, ...]
    embedding_bytes: int
    output_bytes: int
    total_bytes: int

    @property
    def expert_bytes(self) -> int:
        return sum(layer.expert_bytes for layer in self.layers)

    def render(self, max_metadata_chars: int = 100) -> str:
        lines = [f"{self.path} ({self.n_files} file{'s' if self.n_files > 1 else ''}, {self.architecture})", ""]
        lines.append("metadata:")
        for key, value in self.metadata:
            value = value.replace("\n", "\\n")  # one line per key (chat templates span many)
            shown = value if len(value) <= max_metadata_chars else value[: max_metadata_chars - 3] + "..."
            lines.append(f"  {key} = {shown}")
        lines += ["", "tensor types:"]
        for count in self.types:
            lines.append(f"  {count.type_name:<8} {count.n_tensors:>6} tensors {_mib(count.n_bytes):>12}")
        lines += ["", "bytes per layer:", f"  {'layer':>5}  {'mixer':<9} {'experts':>12} {'rest':>12}"]
        for layer in self.layers:
            lines.append(
                f"  {layer.index:>5}  {layer.mixer:<9} {_mib(layer.expert_bytes):>12} {_mib(layer.other_bytes):>12}"
            )
        non_layer = self.embedding_bytes + self.output_bytes
        lines += [
            "",
            f"token embedding {_mib(self.embedding_bytes)}, output {_mib(self.output_bytes)}",
            f"total {_mib(self.total_bytes)}: routed experts {_mib(self.expert_bytes)}, "
            f"everything else {_mib(self.total_bytes - self.expert_bytes)} (of which outside layers {_mib(non_layer)})",
        ]
        return "\n".join(lines)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 20):.2f} MiB"


def render_value(field: gguf.ReaderField) -> str:
    """A metadata value as text; arrays longer than a few items are summarized."""
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        n_items = len(field.data)
        item_type = field.types[-1].name.lower() if len(field.types) > 1 else "?"
        if n_items > _ARRAY_ITEMS_SHOWN:
            head = ", ".join(repr(field.contents(i)) for i in range(3))
            return f"[{n_items} {item_type}: {head}, ...]"
        return repr(field.contents())
    value: Any = field.contents()
    return str(value)


def inspect_gguf(path: Path) -> Inspection:
    path = Path(path)
    try:
        shape = read_model_shape(path)
        reader = gguf.GGUFReader(path)
    except (GgufError, OSError, ValueError) as exc:
        raise InspectError(f"cannot read {path} as GGUF: {exc}") from exc
    metadata = tuple((key, render_value(field)) for key, field in reader.fields.items() if not key.startswith("GGUF."))
    by_type: Counter[str] = Counter()
    bytes_by_type: Counter[str] = Counter()
    for tensor in shape.tensors:
        by_type[tensor.type_name] += 1
        bytes_by_type[tensor.type_name] += tensor.n_bytes
    types = tuple(
        TypeCount(name, by_type[name], bytes_by_type[name]) for name in sorted(by_type, key=lambda n: -bytes_by_type[n])
    )
    layers = tuple(
        LayerBytes(layer.index, layer.mixer_kind, layer.expert_bytes, layer.non_expert_bytes) for layer in shape.layers
    )
    return Inspection(
        path=path,
        n_files=len(shape.file_sizes),
        architecture=shape.architecture,
        metadata=metadata,
        types=types,
        layers=layers,
        embedding_bytes=shape.embedding_bytes,
        output_bytes=shape.output_bytes,
        total_bytes=shape.total_bytes,
    )
