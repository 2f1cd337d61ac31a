"""JPEG decoding the zune-jpeg way, on the DCT coefficients libjpeg-turbo reads."""
