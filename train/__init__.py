"""Training, enhancement and evaluation of the IR-SDE low-light model (`python -m train ...`).

From Python: ``load_enhancer(path)`` returns a callable that enhances (3, H, W) image tensors,
``enhance_file(path, input, output)`` enhances image files; ``read_image`` / ``write_image`` read
and write PNG, JPEG and TIFF (8 or 16 bits)."""
from .data import DataError, read_image, write_image
from .inference import Enhancer, enhance_file, load_enhancer

__all__ = ["DataError", "Enhancer", "enhance_file", "load_enhancer", "read_image", "write_image"]
