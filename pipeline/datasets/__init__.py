"""CSV metadata layer and video reading."""
