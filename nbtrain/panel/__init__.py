"""The notebook front-end: ipywidgets controls and bqplot figures over an Experiment."""

from .dashboard import Dashboard
from .plots import decimate, smooth

__all__ = ["Dashboard", "decimate", "smooth"]
