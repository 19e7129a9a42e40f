"""Datasets. For now the offline default: scikit-learn's handwritten digits."""

from diffusion.data.digits import DIGITS_TEST_SIZE, load_digits_uint8, to_model_range

__all__ = ["DIGITS_TEST_SIZE", "load_digits_uint8", "to_model_range"]
