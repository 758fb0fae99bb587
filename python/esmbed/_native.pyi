"""Type stubs of the Rust extension (``esmbed._native``); the public API is ``esmbed``."""

from typing import Any, List, Optional, Tuple

__version__: str
cuda: bool

class Embedder:
    def __init__(
        self,
        model: str,
        device: str = ...,
        dtype: str = ...,
        tokens_per_batch: Optional[int] = ...,
    ) -> None: ...
    @property
    def model(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def devices(self) -> List[str]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def tokens_per_batch(self) -> int: ...
    @property
    def has_head(self) -> bool: ...
    def embed(
        self,
        rows: Any,
        *,
        seq_column: str,
        id_column: str,
        name: str,
        layers: List[int],
        mean: bool,
        bos: bool,
        per_residue: bool,
        pll: bool,
        strict: bool,
        dedupe: bool,
        reuse: bool,
        max_length: Optional[int],
        long: str,
        unknown: str,
        output_dtype: str,
        rows_per_part: Optional[int],
    ) -> Tuple[Any, Any, str]: ...

def main(argv: List[str]) -> int: ...
def embed_file(argv: List[str]) -> Optional[str]: ...
def sql(argv: List[str]) -> Optional[Any]: ...
def cuda_device_count() -> int: ...
