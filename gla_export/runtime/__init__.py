"""Running exported models: ONNX Runtime sessions with our custom-op library registered
(:func:`create_session`), TensorRT engines (gla_export.runtime.tensorrt), the runtime adapters
(gla_export.runtime.engines: :data:`RUNTIMES` are what ``--backend`` names), and the stateful
decoder (gla_export.runtime.decoder, generation). Heavy runtimes are imported only when used."""

from __future__ import annotations

from .session import PROVIDERS, available_providers, create_session

__all__ = ["PROVIDERS", "available_providers", "create_session"]

# the stateful decoder (gla_export.runtime.decoder, sampling, state)
from .decoder import RUNTIMES, Generation, RowResult, StatefulDecoder, TokenEvent  # noqa: E402
from .sampling import Sampler, SamplingParams  # noqa: E402
from .state import ConversationState, StateCache, StateFileError, load_state, save_state  # noqa: E402

__all__ += ["RUNTIMES",
            "ConversationState", "Generation", "RowResult", "Sampler", "SamplingParams", "StateCache",
            "StateFileError", "StatefulDecoder", "TokenEvent", "load_state", "save_state"]
