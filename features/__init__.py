"""Feature extraction: media decoding, denoising, ASR, face crops, encoders and the HDF5 store."""
