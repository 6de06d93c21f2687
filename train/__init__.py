"""fashion-serve training pipeline. Kept import-free so serving can import train.preprocess without torch."""
