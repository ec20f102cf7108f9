"""Writing IDX files (the format of MNIST / Fashion-MNIST) for the data and command-line tests."""
import gzip
import struct

import numpy as np


def write_idx(path, array: np.ndarray, code: int, compress: bool) -> None:
    """Write ``array`` as an IDX file with type code ``code`` (0x08 uint8, 0x0C int32, ...), gzipped or plain."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)
