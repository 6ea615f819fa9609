"""Real datasets: UTKFace and FER2013 through TFDS (array_record, no TensorFlow).

Modules: `utk_face`, `fer2013` (builders and loaders to numpy arrays), `utkface_names` (file-name
parsing), `cleaning` (duplicates, age filter), `splits` (dedup / paper / leaky protocols),
`balance` (undersampling, per-class cap, class weights). Import the one you need; only
`DataError` is re-exported here so that this package stays cheap to import.
"""

from agejax.data.errors import DataError

__all__ = ['DataError']
