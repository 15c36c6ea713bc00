"""What the decoder needs from a runtime, and the checks every runtime shares."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, TYPE_CHECKING

import torch

from ...errors import ModelError, first_line

if TYPE_CHECKING:
    from ...export.metadata import ExportMetadata

RUNTIMES = ("ort-cpu", "ort-cuda", "trt")  # what --backend names: the runtimes that run an export


class Runtime(Protocol):
    """Runs an export's two graphs on torch tensors passed by pointer (all on ``device``).

    ONNX Runtime's adapter holds two *sessions*, TensorRT's two *engines*; both are runtimes.
    ``check`` (a classmethod) tells, without loading anything, whether this runtime can run an
    export here: it returns what runs it, or raises MissingRuntimeError/UsageError saying what is
    missing. The decoder and ``verify`` both ask it."""

    names: ClassVar[tuple[str, ...]]
    device: torch.device
    has_mask: bool
    max_batch: int | None
    max_seq: int | None
    name: str

    @classmethod
    def check(cls, metadata: ExportMetadata, **options: Any) -> str: ...

    def bind_step(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> Any:
        """A handle that runs the step graph on exactly these buffers, made once per batch setup."""

    def run_step(self, handle: Any) -> None: ...

    def run(self, graph: str, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None: ...

    def sync(self) -> None: ...


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def check_graph_io(metadata: ExportMetadata, graph: str, inputs: list[str], outputs: list[str], what: str) -> None:
    """ModelError (exit 3) when a loaded graph's inputs or outputs are not those the metadata lists
    for ``graph``: a graph file replaced by another (the prefill graph copied over the step
    graph, say) fails here in one line instead of deep inside a runtime."""
    info = metadata.graphs[graph]
    want_in, want_out = set(info.input_names), set(info.output_names)
    got_in, got_out = set(inputs), set(outputs)
    if got_in == want_in and want_out <= got_out:
        return
    diff = []
    if got_in - want_in:
        diff.append(f"unexpected inputs {sorted(got_in - want_in)[:3]}")
    if want_in - got_in:
        diff.append(f"missing inputs {sorted(want_in - got_in)[:3]}")
    if want_out - got_out:
        diff.append(f"missing outputs {sorted(want_out - got_out)[:3]}")
    raise ModelError(f"{what} is not this export's {graph} graph ({'; '.join(diff)}): "
                     "the export is damaged or mixed (export it again)")


def check_graph_files(metadata: ExportMetadata) -> None:
    """:func:`check_graph_io` on both graph files, read without their weights (milliseconds): for
    callers that hand the files to another loader (``verify``'s Polygraphy runners)."""
    import onnx

    for graph in ("prefill", "step"):
        path = metadata.path(graph)
        try:
            g = onnx.load(str(path), load_external_data=False).graph
        except Exception as e:  # noqa: BLE001 - protobuf's errors: the file is not an ONNX model
            why = first_line(e)
            raise ModelError(f"{path} is not a readable ONNX model: {why}") from e
        initializers = {t.name for t in g.initializer}
        inputs = [i.name for i in g.input if i.name not in initializers]
        check_graph_io(metadata, graph, inputs, [o.name for o in g.output], str(path))
