"""segment: 2D/3D U-Nets whose long skip connections are switches."""

__version__ = "0.1.0"
