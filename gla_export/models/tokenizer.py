"""The byte-level tokenizer of the sample model: ids 0-255 are bytes, then BOS and EOS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ByteTokenizer:
    bos_token_id: int = 256
    eos_token_id: int = 257

    @property
    def vocab_size(self) -> int:
        return max(self.bos_token_id, self.eos_token_id) + 1

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], errors: str = "replace") -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors=errors)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes (for streaming: a multi-byte character may arrive across several tokens)."""
        return bytes(i for i in ids if 0 <= i < 256)
