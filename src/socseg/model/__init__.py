"""The networks and what they are judged by: U-Net encoders, losses, the confusion-matrix scorer,
the exported raw-grey model, and the classical baselines."""
